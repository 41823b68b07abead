"""A training config's compiled programs and resident buffers on a target's mesh, and the checks a run makes
before any work (batch rows that divide the batch devices, a resident set that fits the device).

``plan_config(cfg, target)`` builds, with abstract inputs at the config's shapes, the sampler's prefill and
decode (``poer_jax.sampler.programs.sampler_program_specs``), the log-prob pass and the update step
(``poer_jax.rl.programs.trainer_program_specs``), compiles each for the target and returns the
``PlanReport``. Only those two functions' signatures are relied on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax import poer
from poer_jax.model.config import QwenConfig
from poer_jax.model.presets import preset, preset_names
from poer_jax.model.sharding import make_mesh
from poer_jax.plan.compile import compile_program, target_devices
from poer_jax.plan.report import PlanReport, build_report
from poer_jax.plan.spec import RESIDENT_CACHE_POOL, ProgramSpec
from poer_jax.plan.step_cost import price_steps
from poer_jax.plan.targets import GB, Target
from poer_jax.rl.batch import LENGTH_MULTIPLE, length_ladder
from poer_jax.train.config import ConfigError, apply_overrides

OPEN_RS_QUESTIONS = 7000  # open-rs' training split, the paper's data (cache pool rows when no data file is read)


def model_shapes(cfg: ml_collections.ConfigDict) -> tuple[QwenConfig, str]:
    """The model's shapes without its weights: ``model.path``'s config.json, ``model.preset``, or the preset
    whose name the missing ``model.path`` ends with (e.g. DeepSeek-R1-Distill-Qwen-7B). Numerics from
    ``model.param_dtype`` / ``dtype`` / ``remat`` / ``attention``."""
    m = cfg.model
    numerics = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention)
    if m.path is not None and (Path(m.path) / "config.json").is_file():
        return QwenConfig.from_pretrained(m.path, **numerics), f"shapes from {m.path}/config.json"
    if m.preset is not None:
        return preset(m.preset, **numerics), f"shapes of preset {m.preset}"
    name = Path(str(m.path)).name.lower()
    for p in sorted(preset_names(), key=len, reverse=True):
        if re.search(rf"(^|[-_/]){re.escape(p)}$", name):
            return preset(p, **numerics), f"model.path {m.path} is not here: shapes of preset {p}"
    raise ConfigError(f"config key 'model.path': {m.path} has no config.json and matches no preset "
                      f"({', '.join(preset_names())}); pass --config.model.preset=NAME --config.model.path=None")


def mesh_for(cfg: ml_collections.ConfigDict, devices: list[Any]) -> Mesh:
    devices = devices[: cfg.mesh.num_devices] if cfg.mesh.num_devices else devices
    try:
        return make_mesh({"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}, devices)
    except ValueError as e:
        raise ConfigError(f"config section 'mesh': {e}") from e


def check_batch_layout(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The rows of every mini-batch and micro-batch divide over the batch devices (data x fsdp), or a
    ConfigError names the keys: otherwise XLA silently falls back to another layout."""
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]
    o = cfg.optim
    rows = cfg.data.questions_per_step * cfg.rollout.group_size
    mini = rows // o.num_minibatches
    micro = mini // o.micro_batches
    if mini % n_dev or micro % n_dev:
        good = [k for k in range(1, mini + 1) if mini % k == 0 and (mini // k) % n_dev == 0]
        hint = (f"e.g. optim.micro_batches in {good[-4:]} ({[mini // k for k in good[-4:]]} rows each)" if good
                else "make data.questions_per_step x rollout.group_size / optim.num_minibatches a multiple of it")
        raise ConfigError(
            f"config keys 'optim.micro_batches' / 'optim.num_minibatches': micro-batches of {micro} rows "
            f"(data.questions_per_step {cfg.data.questions_per_step} x rollout.group_size {cfg.rollout.group_size}"
            f" / num_minibatches {o.num_minibatches} / micro_batches {o.micro_batches}) do not divide over the "
            f"{n_dev} batch devices (mesh data x fsdp); {hint}")


def resident_estimate(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                      memory_bytes: float | None = None) -> dict[str, int]:
    """Per-device bytes of what a run keeps on every device, without compiling: train state (weights + Adam
    moments), reference weights (beta > 0), the update's float32 gradient, the sampler's decode-layout copy
    of the weights (compute dtype, whole on every device of the batch axes, split over ``tensor``) and the KV
    pool (from the budget keys; ``rollout.kv_cache_fraction`` takes its share of what the rollout's other
    buffers leave of ``memory_bytes``). The last two are live during the rollout only, the gradient during
    the update only (``rollout_and_update_bytes``)."""
    from poer_jax.plan.compile import device_bytes
    from poer_jax.rl.programs import abstract_params, abstract_train_state
    from poer_jax.sampler.budget import kv_bytes_per_page
    from poer_jax.sampler.sharded import head_shards

    trainer = _update_trainer(cfg, mcfg, mesh)
    out = {"train state": device_bytes(abstract_train_state(trainer))}
    if cfg.loss.beta > 0:
        out["reference weights"] = device_bytes(abstract_params(trainer, mcfg.jnp_dtype))
    out["gradient"] = device_bytes(abstract_params(trainer, jax.numpy.float32))
    out["sampler weights"] = device_bytes(abstract_decode_params(mcfg, mesh))
    free = None if memory_bytes is None else max(memory_bytes - sum(out.values()) + out["gradient"], 0.0)
    scfg = sampler_config_for(cfg, mcfg, mesh, free)
    per_page = kv_bytes_per_page(mcfg, scfg.page_size, scfg.kv_dtype or mcfg.dtype, head_shards(mcfg, mesh))
    out["KV pool (K and V)"] = scfg.num_pages * per_page
    return out


def rollout_and_update_bytes(parts: dict[str, int]) -> tuple[int, int]:
    """(rollout, update) per-device bytes of ``resident_estimate``'s parts: the trainer releases the
    sampler's weights and KV pool for the update (``GroupSampler.release``)."""
    total = sum(parts.values())
    rollout_only = parts.get("sampler weights", 0) + parts.get("KV pool (K and V)", 0)
    return total - parts.get("gradient", 0), total - rollout_only


def abstract_decode_params(mcfg: QwenConfig, mesh: Mesh) -> Any:
    """The sampler's weights as ``GroupSampler`` holds them (``sampler.programs``), abstract."""
    from poer_jax.model.qwen import param_shapes
    from poer_jax.model.sharding import decode_param_shardings

    return jax.tree.map(lambda s, sd: jax.ShapeDtypeStruct(s, mcfg.jnp_dtype, sharding=sd), param_shapes(mcfg),
                        decode_param_shardings(mcfg, mesh), is_leaf=lambda x: isinstance(x, tuple))


def check_resident_memory(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                          memory_bytes: float | None) -> None:
    """ConfigError naming the keys when the resident set alone exceeds ``memory_bytes`` per device."""
    if not memory_bytes:
        return
    parts = resident_estimate(cfg, mcfg, mesh, memory_bytes)
    total = max(rollout_and_update_bytes(parts))
    if total > memory_bytes:
        detail = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in parts.items())
        raise ConfigError(
            f"the run does not fit: per device it keeps up to {total / GB:.1f} GB ({detail}; the sampler's weights "
            "and KV pool during the rollout, the gradient during the update) before any activation, "
            f"the device has {memory_bytes / GB:.1f} GB. Change mesh.* (shard over more devices), "
            "rollout.kv_cache_gb / rollout.kv_cache_fraction / rollout.num_pages, loss.beta or model.param_dtype; "
            "scripts/plan.py --target=... gives the full plan")


def _update_trainer(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh) -> Any:
    from poer_jax.train import builders

    return builders.build_update_trainer(cfg, mcfg, mesh)


def sampler_config_for(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                       free_bytes: float | None = None) -> Any:
    """The run's ``SamplerConfig`` on ``mesh`` as ``PoerTrainer`` builds it (one process holding the whole
    mesh; no tokenizer: EOS / pad ids do not change shapes). ``free_bytes``: the device memory left for the
    KV pool, used by ``rollout.kv_cache_fraction``. When that leaves no room for one group at full length,
    the pool is planned at that minimum instead, so the plan shows what does not fit."""
    from poer_jax.train import builders

    def build(c: ml_collections.ConfigDict) -> Any:
        return builders.sampler_config(c, mcfg, mesh, eos_ids=(0,), pad_id=0, process_count=1,
                                       num_eval_problems=0, free_bytes=free_bytes)

    try:
        return build(cfg)
    except ConfigError:
        r = cfg.rollout
        if free_bytes is None or r.num_pages or r.kv_cache_fraction is None:
            raise
        max_seq = cfg.data.max_prompt_len + max(r.max_completion_len, cfg.eval.max_new_tokens or 0)
        pages = (-(-max_seq // r.page_size) + 1) * (1 + max(r.group_size, cfg.eval.num_samples))
        return build(apply_overrides(cfg, [f"rollout.num_pages={pages}"]))


def trainer_and_sampler_config(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                               memory_bytes: float | None = None) -> tuple[Any, Any]:
    """The run's ``Trainer`` and ``SamplerConfig`` on ``mesh`` (as ``PoerTrainer`` builds them), the KV pool
    sized for a device of ``memory_bytes``."""
    trainer = _update_trainer(cfg, mcfg, mesh)
    free = None
    if memory_bytes is not None:
        parts = resident_estimate(cfg, mcfg, mesh, memory_bytes)
        free = max(memory_bytes - rollout_and_update_bytes(parts)[0] + parts["KV pool (K and V)"], 0.0)
    return trainer, sampler_config_for(cfg, mcfg, mesh, free)


def abstract_cache_pool(num_questions: int, max_len: int, mesh: Mesh) -> Any:
    pool = jax.eval_shape(lambda: poer.create(num_questions, max_len, 0))
    sh = poer.pool_sharding(pool, mesh)
    return [jax.ShapeDtypeStruct(getattr(pool, f).shape, getattr(pool, f).dtype, sharding=getattr(sh, f))
            for f in poer.cache_pool.ARRAY_FIELDS]


def program_specs(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh, num_questions: int,
                  memory_bytes: float | None = None) -> tuple[list[ProgramSpec], dict[str, Any], list[str]]:
    """(the four programs, resident buffers no program takes, notes) for a config on ``mesh``, the KV pool
    sized for devices of ``memory_bytes``."""
    from poer_jax.rl.programs import trainer_program_specs
    from poer_jax.sampler.programs import sampler_program_specs

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
    extra = {RESIDENT_CACHE_POOL: abstract_cache_pool(num_questions, r.max_completion_len, mesh)}
    notes.append(f"cache pool: {num_questions} questions x {r.max_completion_len} tokens")
    notes.append(f"update-step lengths: {len(ladder)} ladder values {ladder[0]}..{ladder[-1]}")
    return specs, extra, notes


def plan_config(cfg: ml_collections.ConfigDict, target: Target, *, num_questions: int | None = None,
                memory_fraction: float = 0.95, programs: list[str] | None = None,
                log: Any = None) -> PlanReport:
    """Compile the config's programs for ``target`` and judge the fit (``report.py``)."""
    mcfg, shape_note = model_shapes(cfg)
    devices = target_devices(target)
    cfg, mesh_note = mesh_on_fewer_devices(cfg, len(devices))
    mesh = mesh_for(cfg, devices)
    check_batch_layout(cfg, mesh)
    gpu = [*mesh_note, *_gpu_notes(target, mcfg, devices)]
    n_q = num_questions or _count_questions(cfg) or OPEN_RS_QUESTIONS
    specs, extra, notes = program_specs(cfg, mcfg, mesh, n_q, target.chip.memory_bytes * memory_fraction)
    if programs:
        unknown = set(programs) - {s.name for s in specs}
        if unknown:
            raise ConfigError(f"unknown program(s) {sorted(unknown)}; known: {[s.name for s in specs]}")
    notes = [shape_note, f"mesh {dict(mesh.shape)}, attention {mcfg.attention}", *notes,
             "TFLOP / GB accessed / roofline are per call and per device: loop bodies times their trip counts, "
             "custom-call kernels by formula (plan/costs.py); a loop whose exit depends on data is counted once "
             "(the decode segment: one decode step)", *gpu]
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
                        memory_fraction=memory_fraction, notes=notes, device_kind=devices[0].device_kind,
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
    from poer_jax.plan.compile import spec_arg

    out = dict(extra)
    for s in specs:
        if any(s is k for k in kept):
            continue
        for name, where in s.resident.items():
            out.setdefault(name, spec_arg(s, where))
    return out


def _count_questions(cfg: ml_collections.ConfigDict) -> int | None:
    path = cfg.data.train_path
    if path and Path(path).is_file() and str(path).endswith(".jsonl"):
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip()) or None
    return None
