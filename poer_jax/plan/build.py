"""A training config's compiled programs and resident buffers on a target's mesh.

``plan_config(cfg, target)`` assembles the run for the target with abstract inputs, through the same
functions a run assembles itself with (``poer_jax.system``: mesh, model shapes, update trainer, sampler
config, cache pool), builds the sampler's prefill and decode (``poer_jax.sampler.programs.sampler_program_specs``)
and the log-prob pass and update step (``poer_jax.rl.programs.trainer_program_specs``), compiles each for the
target and returns the ``PlanReport``. Only those two functions' signatures are relied on.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from jax.sharding import Mesh

from poer_jax.model.config import QwenConfig
from poer_jax.plan.compile import compile_program, spec_arg, target_devices
from poer_jax.plan.report import PlanReport, build_report
from poer_jax.plan.step_cost import price_steps
from poer_jax.plan.targets import GB, Target
from poer_jax.program_spec import RESIDENT_CACHE_POOL, ProgramSpec
from poer_jax.rl.batch import LENGTH_MULTIPLE, length_ladder
from poer_jax.rl.programs import trainer_program_specs
from poer_jax.sampler.programs import sampler_program_specs
from poer_jax.system.cache_pool import build_empty_pool
from poer_jax.system.config import ConfigError, apply_overrides
from poer_jax.system.data import count_jsonl_rows
from poer_jax.system.memory import trainer_and_sampler_config
from poer_jax.system.mesh import check_batch_layout, mesh_for
from poer_jax.system.model import model_shapes

OPEN_RS_QUESTIONS = 7000  # open-rs' training split, the paper's data (cache pool rows when no data file is read)


def program_specs(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh, num_questions: int,
                  memory_bytes: float | None = None) -> tuple[list[ProgramSpec], dict[str, Any], list[str]]:
    """(the four programs, resident buffers no program takes, notes) for a config on ``mesh``, the KV pool
    sized for devices of ``memory_bytes``."""
    r, d = cfg.rollout, cfg.data
    trainer, scfg = trainer_and_sampler_config(cfg, mcfg, mesh, memory_bytes)
    budget = ("rollout.num_pages" if r.num_pages else
              f"rollout.kv_cache_fraction={r.kv_cache_fraction} of the memory left" if r.kv_cache_fraction is not None
              else f"rollout.kv_cache_gb={r.kv_cache_gb}")
    notes = [f"KV pool: {scfg.num_pages} pages of {scfg.page_size} tokens per device ({budget}, capped at what a "
             "device's share of a step uses)"]
    G = r.group_size
    if r.strategy == "poer":  # longest prompt: question + a whole cached answer but one token
        prefill = sampler_program_specs(mcfg, scfg, mesh, group_size=G,
                                        prompt_len=d.max_prompt_len + r.max_completion_len - 1, max_new_tokens=1)[0]
        notes.append("sampler/prefill at the longest POER prompt (question + cached prefix), "
                     "sampler/decode at the longest continuation")
    else:
        prefill = None
    specs = sampler_program_specs(mcfg, scfg, mesh, group_size=G, prompt_len=d.max_prompt_len,
                                  max_new_tokens=r.max_completion_len)
    if prefill is not None:
        specs = [prefill, *specs[1:]]
    max_len = d.max_prompt_len + r.max_completion_len
    ladder = length_ladder(max_len, LENGTH_MULTIPLE)
    specs += trainer_program_specs(trainer, rows=d.questions_per_step * G, seq_len=ladder[-1],
                                   num_minibatches=cfg.optim.num_minibatches, with_ref=cfg.loss.beta > 0,
                                   num_lengths=len(ladder))
    extra = {RESIDENT_CACHE_POOL: build_empty_pool(num_questions, r.max_completion_len, 0, mesh, abstract=True)}
    notes.append(f"cache pool: {num_questions} questions x {r.max_completion_len} tokens")
    notes.append(f"update-step lengths: {len(ladder)} ladder values {ladder[0]}..{ladder[-1]}")
    return specs, extra, notes


def target_programs(cfg: ml_collections.ConfigDict, target: Target, *, num_questions: int | None = None,
                    memory_fraction: float = 0.95
                    ) -> tuple[Mesh, QwenConfig, str, list[ProgramSpec], dict[str, Any], list[str]]:
    """The run of ``cfg`` assembled abstractly for ``target``: (mesh, model shapes, where the shapes came from,
    ``program_specs``'s programs, resident buffers and notes), nothing compiled. The target's devices are the
    ones the programs are built for (a GPU target's are CUDA topology devices), so every code-path choice is the
    target's own."""
    mcfg, shape_note = model_shapes(cfg)
    devices = target_devices(target)
    cfg, mesh_note = mesh_on_fewer_devices(cfg, len(devices))
    mesh = mesh_for(cfg, devices)
    check_batch_layout(cfg, mesh)
    n_q = num_questions or _count_questions(cfg) or OPEN_RS_QUESTIONS
    specs, extra, notes = program_specs(cfg, mcfg, mesh, n_q, target.chip.memory_bytes * memory_fraction)
    return mesh, mcfg, shape_note, specs, extra, [*notes, *mesh_note, *_gpu_notes(target, mcfg, devices)]


def plan_config(cfg: ml_collections.ConfigDict, target: Target, *, num_questions: int | None = None,
                memory_fraction: float = 0.95, programs: list[str] | None = None,
                log: Any = None) -> PlanReport:
    """Compile the config's programs for ``target`` and judge the fit (``report.py``)."""
    mesh, mcfg, shape_note, specs, extra, notes = target_programs(cfg, target, num_questions=num_questions,
                                                                  memory_fraction=memory_fraction)
    cfg, _ = mesh_on_fewer_devices(cfg, mesh.size)  # the config as planned (its steps are priced below)
    if programs:
        unknown = set(programs) - {s.name for s in specs}
        if unknown:
            raise ConfigError(f"unknown program(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
    notes = [shape_note, f"mesh {dict(mesh.shape)}, attention {mcfg.attention}", *notes,
             "TFLOP / GB accessed / roofline are per call and per device: loop bodies times their trip counts, "
             "custom-call kernels by formula (plan/costs.py); a loop whose exit depends on data is counted once "
             "(the decode segment: one decode step)"]
    costs = []
    for spec in specs:
        if programs and spec.name not in programs:
            continue
        if log:
            log(f"compiling {spec.name} ({spec.note}) for {target.name} ...")
        costs.append(compile_program(spec, mesh))
        if log:
            log(f"  done in {costs[-1].compile_seconds:.0f}s: temp {costs[-1].temp_bytes / GB:.2f} GB")
    kept = [s for s in specs if not programs or s.name in programs]
    steps = price_steps(cfg, mcfg, mesh.size, kept, costs, target.chip)
    if steps:
        notes.append("step: the config's longest step (plan/step_cost.py), priced per device at each program's "
                     "roofline; a decode step attends its whole page table in both figures")
    # every program's resident arguments count, compiled or not
    return build_report(target, kept, costs, extra_resident=_resident_of_skipped(specs, kept, extra),
                        memory_fraction=memory_fraction, notes=notes, device_kind=mesh.devices.flat[0].device_kind,
                        compiler=compiler_name(target), steps=steps)


def mesh_on_fewer_devices(cfg: ml_collections.ConfigDict, available: int) -> tuple[ml_collections.ConfigDict,
                                                                                  list[str]]:
    """A config whose fixed mesh needs more devices than the target has is planned with its state sharded over
    the devices there are (fsdp), so the verdict names what does not fit (exit 1) rather than only the mesh; the
    note says so. Otherwise the config as it is."""
    m = cfg.mesh
    sizes = [s for s in (m.data, m.fsdp, m.tensor) if s != -1]
    need = m.num_devices or math.prod(sizes)
    if -1 in (m.data, m.fsdp, m.tensor) or need <= available:
        return cfg, []
    note = (f"config section 'mesh' (data {m.data} x fsdp {m.fsdp} x tensor {m.tensor}) needs {need} devices, the "
            f"target has {available}: planned with mesh.fsdp={available} (data 1, tensor 1) instead")
    return apply_overrides(cfg, ["mesh.data=1", f"mesh.fsdp={available}", "mesh.tensor=1", "mesh.num_devices=0"]), \
        [note]


def compiler_name(target: Target) -> str:
    """What compiled the plan's programs."""
    from poer_jax.plan.gpu import COMPILER

    return {"gpu": COMPILER, "tpu": "XLA:TPU (libtpu), compiled"}.get(target.platform, "XLA:CPU, compiled")


def _gpu_notes(target: Target, mcfg: QwenConfig, devices: list[Any]) -> list[str]:
    if target.platform != "gpu":
        return []
    from poer_jax.plan.compile import PlanError
    from poer_jax.plan.gpu import GpuPlanError, gpu_notes

    try:
        return gpu_notes(target, mcfg, devices)
    except GpuPlanError as e:
        raise PlanError(str(e)) from None


def _resident_of_skipped(specs: list[ProgramSpec], kept: list[ProgramSpec], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(extra)
    for s in specs:
        if any(s is k for k in kept):
            continue
        for name, where in s.resident.items():
            out.setdefault(name, spec_arg(s, where))
    return out


def _count_questions(cfg: ml_collections.ConfigDict) -> int | None:
    return count_jsonl_rows(cfg.data.train_path, cfg.data.limit) or None
