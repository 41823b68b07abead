"""The plan command: compile a tiny preset for a TPU topology and for 8 host CPU devices, judge the fit both ways,
and the script's exit codes and messages. Also the checks a run makes before any work, and the length ladder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh

from poer_jax.model import init_params, preset
from poer_jax.model.qwen import forward
from poer_jax.plan import get_target
from poer_jax.plan.build import plan_config
from poer_jax.plan.compile import target_devices
from poer_jax.plan.report import build_report
from poer_jax.rl.batch import ladder_length, length_ladder
from poer_jax.system import runtime
from poer_jax.system.config import ConfigError, apply_overrides, load_config_file, validate
from poer_jax.system.memory import check_resident_memory
from poer_jax.system.mesh import check_batch_layout, mesh_for
from poer_jax.system.model import model_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny-hd128", "model.path=None", "data.train_path=unused.jsonl", "toy.enabled=false",
        "mesh.fsdp=-1", "data.questions_per_step=8", "rollout.group_size=4", "data.max_prompt_len=64",
        "rollout.max_completion_len=192", "model.dtype=bfloat16", "optim.micro_batches=2", "loss.beta=0.04"]

try:
    import libtpu  # noqa: F401

    HAS_LIBTPU = True
except ImportError:
    HAS_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu not installed: pip install -e ".[test]"')
on_libtpu = pytest.mark.xdist_group("libtpu")  # the tests that compile for a TPU topology: one worker loads libtpu


def _cfg(*extra: str):
    return validate(apply_overrides(load_config_file(ROOT / "configs/arithmetic.py"), [*TINY, *extra]))


def test_cpu8_plan_compiles_and_judges_both_ways() -> None:
    target = get_target("cpu-8")
    report = plan_config(_cfg(), target, num_questions=64, programs=["train/logprobs"])
    assert report.fits and [p.name for p in report.programs] == ["train/logprobs"]
    p = report.programs[0]
    assert p.cost.temp_bytes > 0 and p.cost.flops > 0 and p.roofline_s > 0
    # per call: the log-prob pass's layer scan and micro-batch loop multiplied, not XLA's one body
    assert p.cost.flops > 2 * p.cost.calls.xla_flops
    assert p.num_shapes == 2 * len(length_ladder(64 + 192))  # policy and reference weights, every ladder length
    # every resident buffer counts, including those of programs not compiled here (sampler) and the cache pool
    assert set(report.resident) == {"train/state", "train/ref_params", "sampler/params", "sampler/kv_pool",
                                   "poer/cache_pool"}
    assert p.peak_bytes >= report.resident_bytes
    data = json.loads(json.dumps(report.to_json()))
    assert data["fits"] and data["programs"][0]["name"] == "train/logprobs"
    # the same compiled program judged against a budget it exceeds
    tight = build_report(target, [_spec_named(report)], [p.cost], memory_fraction=p.peak_bytes / 2 / 24 / 1024**3)
    assert not tight.fits
    assert "train/logprobs does not fit on cpu-8" in tight.failures()[0]
    assert "optim.micro_batches" in tight.failures()[0]


def test_the_update_runs_without_the_samplers_buffers() -> None:
    """A program that the run gives the sampler's memory (``released``) peaks without the sampler's weights and
    KV pool; the sampler's programs with them; the before-work check takes the larger phase."""
    from poer_jax.plan.compile import CompiledCost
    from poer_jax.program_spec import RESIDENT_KV_POOL, RESIDENT_TRAIN_STATE, ROLLOUT_BUFFERS, ProgramSpec
    from poer_jax.system.memory import rollout_and_update_bytes

    mesh = Mesh(jax.devices()[:1], ("x",))
    abstract = lambda n: jax.ShapeDtypeStruct((n,), jnp.uint8, sharding=jax.NamedSharding(mesh, jax.P()))  # noqa: E731
    sampler = ProgramSpec("sampler/decode", None, (abstract(100), abstract(1000)),
                          resident={RESIDENT_TRAIN_STATE: 0, RESIDENT_KV_POOL: 1})
    update = ProgramSpec("train/update", None, (abstract(100),), resident={RESIDENT_TRAIN_STATE: 0},
                         released=ROLLOUT_BUFFERS)
    cost = lambda args: CompiledCost(argument_bytes=args, output_bytes=0, alias_bytes=0, temp_bytes=10,  # noqa: E731
                                     flops=1.0, bytes_accessed=1.0, compile_seconds=0.0)
    report = build_report(get_target("cpu-1"), [sampler, update], [cost(1100), cost(100)])
    peaks = {p.name: p.peak_bytes for p in report.programs}
    assert peaks == {"sampler/decode": 1110, "train/update": 110}
    parts = {"train state": 100, "gradient": 40, "sampler weights": 30, "KV pool (K and V)": 1000}
    assert rollout_and_update_bytes(parts) == (1130, 140)


def _spec_named(report):
    from poer_jax.plan.build import program_specs

    cfg = _cfg()
    mcfg, _ = model_shapes(cfg)
    specs, _, _ = program_specs(cfg, mcfg, mesh_for(cfg, target_devices(get_target("cpu-8"))), 64)
    return next(s for s in specs if s.name == report.programs[0].name)


@needs_libtpu
@on_libtpu
def test_tpu_plan_compiles_splash_attention_and_fits() -> None:
    target = get_target("tpu-v5e-4")
    mesh = mesh_for(_cfg(), target_devices(target))
    assert mesh.devices.flat[0].platform == "tpu"
    # the model's attention on a TPU mesh is the Pallas splash kernel (a Mosaic custom call)
    cfg = preset("tiny-hd128", dtype="bfloat16")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    with jax.set_mesh(mesh):
        text = jax.jit(forward, static_argnums=1).lower(params, cfg, tokens).as_text()
    assert "tpu_custom_call" in text
    report = plan_config(_cfg(), target, num_questions=64, programs=["sampler/prefill"])
    assert report.fits and report.programs[0].cost.temp_bytes > 0


@needs_libtpu
@on_libtpu
def test_plan_script_exit_codes_and_messages(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, str(ROOT / "scripts/plan.py"), f"--config={ROOT / 'configs/arithmetic.py'}",
            *(f"--config.{o}" for o in TINY), "--num-questions=64"]
    out = subprocess.run([*base, "--target=tpu-v9-1"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "tpu-v5p-8" in out.stderr and "cpu-N" in out.stderr
    # a KV pool of 4M pages (~34 GB per chip) cannot fit a 16 GiB v5e chip: exit 1, naming program and keys
    out = subprocess.run([*base, "--target=tpu-v5e-4", "--programs=sampler/prefill",
                          "--config.rollout.num_pages=4000000", f"--json={tmp_path / 'plan.json'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sampler/prefill does not fit on tpu-v5e-4" in out.stdout and "rollout.num_pages" in out.stdout
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is False


def test_batch_rows_must_divide_the_batch_devices() -> None:
    mesh = Mesh(jax.devices()[:8], ("fsdp",)).devices.reshape(1, 8, 1)
    mesh = Mesh(mesh, ("data", "fsdp", "tensor"))
    cfg = _cfg("data.questions_per_step=96", "rollout.group_size=6", "optim.micro_batches=48")
    with pytest.raises(ConfigError, match="12 rows.*8 batch devices.*optim.micro_batches"):
        check_batch_layout(cfg, mesh)  # the old 7B layout: 576 / 48 = 12 rows on 8 devices
    check_batch_layout(_cfg("data.questions_per_step=96", "rollout.group_size=6", "optim.micro_batches=72"), mesh)


def test_resident_set_over_device_memory_fails_before_work() -> None:
    cfg = _cfg("loss.beta=0.04")
    mcfg, _ = model_shapes(cfg)
    mesh = mesh_for(cfg, jax.devices()[:1])
    check_resident_memory(cfg, mcfg, mesh, 1e12)
    with pytest.raises(ConfigError, match="does not fit.*train state.*reference weights.*KV pool"):
        check_resident_memory(cfg, mcfg, mesh, 1e6)
    # a KV fraction of a device the rest already fills: the pool is planned at one group, the verdict says why
    frac = _cfg("loss.beta=0.04", "rollout.kv_cache_fraction=0.5")
    with pytest.raises(ConfigError, match="does not fit.*KV pool"):
        check_resident_memory(frac, mcfg, mesh, 1e6)


def test_model_shapes_from_a_missing_path_name_a_preset() -> None:
    cfg = load_config_file(ROOT / "configs/qwen7b.py")
    mcfg, note = model_shapes(cfg)
    assert mcfg.num_layers == 28 and mcfg.param_dtype == "float32" and mcfg.dtype == "bfloat16"
    assert "r1-distill-qwen-7b" in note


def test_length_ladder() -> None:
    assert length_ladder(4608) == [128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 4608]
    assert [ladder_length(n, 128, 4608) for n in (1, 129, 385, 3073, 4097, 4608)] == [128, 256, 512, 4096, 4608,
                                                                                      4608]
    assert ladder_length(5000, 128, 4608) == 6144  # longer than the cap: the next ladder step
    assert all(length % 128 == 0 for length in length_ladder(10_000))


def test_persistent_compilation_cache(tmp_path: Path, monkeypatch) -> None:
    before = jax.config.jax_compilation_cache_dir
    try:
        cfg = _cfg(f"workdir={tmp_path}")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "shared"))
        assert runtime.enable_compilation_cache(cfg) == tmp_path / "shared"
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        assert runtime.enable_compilation_cache(cfg) == tmp_path / "jax_cache"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
        assert runtime.enable_compilation_cache(_cfg("train.compilation_cache_dir=")) is None
    finally:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_mesh_larger_than_the_target_is_planned_over_its_devices() -> None:
    """The 7B config's fsdp 4 x tensor 2 on one device: planned with the state over that device, with a note, so
    the verdict names the programs that do not fit (and mesh.*), not only the mesh."""
    from poer_jax.plan.build import mesh_on_fewer_devices

    cfg = load_config_file(ROOT / "configs/qwen7b.py")
    same, note = mesh_on_fewer_devices(cfg, 8)
    assert same is cfg and note == []
    one, note = mesh_on_fewer_devices(cfg, 1)
    assert (one.mesh.data, one.mesh.fsdp, one.mesh.tensor) == (1, 1, 1)
    assert "needs 8 devices, the target has 1" in note[0]
    auto = _cfg()  # mesh.fsdp=-1 takes whatever there is
    assert mesh_on_fewer_devices(auto, 1) == (auto, [])
