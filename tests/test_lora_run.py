"""LoRA in whole runs: a run with adapters resumes exactly (its checkpoints hold the adapters alone, its export the
merged model and the adapters in PEFT's layout, its KL reference no copy), the plan prices a LoRA step below the
full update's on 8 CPU devices and fits the 7B on a v5e-8 where the full update does not, and the arithmetic config
learns with LoRA (paired test over held-out problems, as its full-weight test in tests/test_toy_demo.py)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from poer_jax.system.config import apply_overrides, default_config, load_config_file, validate
from tests.helpers_runs import HELPERS, LEARNING, ROOT
from tests.helpers_runs import metrics as _metrics
from tests.helpers_runs import overrides as _overrides

LORA_RUN = {"lora.rank": 4, "lora.alpha": 8.0, "loss.beta": 0.04, "optim.learning_rate": 0.01,
            "train.max_steps": 2, "train.export_final": True,
            "reward.functions": f"accuracy,format,{HELPERS}:digit_count"}  # a reward spread, so the policy moves


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens/decoded_per_s", "eval/time_s"))}
            for r in rows]


def test_lora_run_resumes_exactly_and_exports_merged_weights_and_peft_adapters(toy_env, tmp_path) -> None:
    """A 2-step LoRA run with a KL term; the same run that lost its last checkpoint (a kill before it was
    committed) resumes from step 1 and ends with the same adapters, Adam moments and metrics, bit for bit."""
    from poer_jax.model import load_hf
    from poer_jax.model.adapters import merge
    from poer_jax.model.peft_io import load_peft
    from poer_jax.train.checkpoint import Checkpointer
    from poer_jax.train.loop import PoerTrainer

    cfg = validate(apply_overrides(default_config(), _overrides(toy_env, tmp_path / "a", **LORA_RUN)))
    with PoerTrainer(cfg) as run:
        assert run.ref_params is None  # the KL reference is the trainer's frozen base, no copy
        base = run.trainer.base_params
        run.run()
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "2")
    with PoerTrainer(apply_overrides(cfg, [f"workdir={b}"])) as resumed:
        assert resumed.step == 1
        resumed.run()
    assert _comparable(_metrics(b)) == _comparable(_metrics(a))
    assert max(m["grad_norm"] for m in _metrics(a) if "grad_norm" in m) > 0
    sa, _, _ = Checkpointer(a / "checkpoints", keep=5).restore(2)
    sb, _, _ = Checkpointer(b / "checkpoints", keep=5).restore(2)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    # the checkpoint holds the adapters and their optimizer state only: nothing of the base's size
    assert set(sa["params"]["layers"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}
    biggest = max(np.size(x) for x in jax.tree.leaves(sa))
    assert biggest < base["embed"].size and biggest < base["layers"]["gate_proj"].size
    # the export: the merged model (an HF directory) and the final adapters in PEFT's layout beside it
    adapters, lora = load_peft(a / "export" / "adapter", load_hf(a / "export")[1])
    assert (lora.rank, lora.alpha) == (4, 8.0)
    jax.tree.map(np.testing.assert_array_equal, adapters, sa["params"])
    assert json.loads((a / "export" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == toy_env["model"]
    merged, _ = load_hf(a / "export")
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, jax.device_get(merged), jax.device_get(merge(base, adapters, lora)))
    # python -m poer_jax.evaluate --model WORKDIR: the checkpoint's adapters merged into the run's base
    from poer_jax.evaluate import _model_from_checkpoint
    from poer_jax.model import make_mesh

    weights, _, _, _ = _model_from_checkpoint(a, make_mesh({"fsdp": 1}, jax.devices()[:1]))
    jax.tree.map(close, jax.device_get(weights), jax.device_get(merged))


def test_the_plan_and_a_lora_run_hold_the_same_buffers(toy_env, tmp_path) -> None:
    """tests/test_assembly.py's check with adapters: built abstractly for the plan (cpu-8) and concretely on 8 CPU
    devices (PoerTrainer), the train state (adapters and moments), the frozen base and the sampler's merged weights
    have the same shapes, dtypes and shardings; there is no reference copy on either side."""
    from poer_jax.plan import get_target
    from poer_jax.plan.build import target_programs
    from poer_jax.plan.compile import spec_arg
    from poer_jax.program_spec import RESIDENT_BASE_PARAMS, RESIDENT_SAMPLER_PARAMS, RESIDENT_TRAIN_STATE
    from poer_jax.train.loop import PoerTrainer
    from tests.test_assembly import MESH, _assert_same

    mesh = {k.replace(".", "__"): v for k, v in {**MESH, "lora.rank": 4}.items()}
    cfg = validate(apply_overrides(load_config_file(ROOT / "configs" / "arithmetic.py"), [
        "toy.enabled=false", "warm_start.steps=0", *_overrides(toy_env, tmp_path / "run", **mesh)]))
    _, _, _, specs, _, _ = target_programs(cfg, get_target("cpu-8"))
    planned: dict[str, list] = {}
    for spec in specs:
        for name, where in spec.resident.items():
            planned.setdefault(name, []).append(spec_arg(spec, where))
    assert "train/ref_params" not in planned
    with PoerTrainer(cfg) as run:
        assert run.ref_params is None
        made = {RESIDENT_TRAIN_STATE: run.state, RESIDENT_BASE_PARAMS: run.trainer.base_params,
                RESIDENT_SAMPLER_PARAMS: run.sampler._weights}
        made = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), made)
    for name, tree in made.items():
        for args in planned[name]:
            _assert_same(args, tree, name)


TINY = ["model.preset=tiny-hd128", "model.path=None", "data.train_path=unused.jsonl", "toy.enabled=false",
        "mesh.fsdp=-1", "data.questions_per_step=8", "rollout.group_size=4", "data.max_prompt_len=64",
        "rollout.max_completion_len=192", "model.dtype=bfloat16", "optim.micro_batches=2", "loss.beta=0.04"]


def test_a_lora_step_keeps_less_than_the_full_update_on_8_cpu_devices() -> None:
    """The plan's resident set (and the update's peak) on 8 CPU devices: the base in bfloat16 and the adapters with
    their moments against float32 weights, two moments and a reference copy."""
    from poer_jax.plan import get_target
    from poer_jax.plan.build import plan_config

    def plan(*extra: str):
        cfg = validate(apply_overrides(load_config_file(ROOT / "configs/arithmetic.py"), [*TINY, *extra]))
        return plan_config(cfg, get_target("cpu-8"), num_questions=64, programs=["train/update"])

    full, lora = plan(), plan("lora.rank=8", "lora.alpha=16")
    assert "train/ref_params" in full.resident and "train/ref_params" not in lora.resident
    assert lora.resident["train/base_params"] == full.resident["train/ref_params"]  # the base: compute dtype
    assert lora.resident["train/state"] < full.resident["train/state"] / 4  # rank 8 of a hidden size of 128
    assert lora.resident_bytes < full.resident_bytes
    assert lora.programs[0].peak_bytes < full.programs[0].peak_bytes
    assert lora.programs[0].cost.temp_bytes < full.programs[0].cost.temp_bytes  # no float32 gradient of the model


try:
    import libtpu  # noqa: F401

    HAS_LIBTPU = True
except ImportError:
    HAS_LIBTPU = False


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu not installed: pip install -e ".[test]"')
@pytest.mark.xdist_group("libtpu")
def test_plan_fits_the_7b_with_lora_on_a_v5e_8_where_the_full_update_does_not(tmp_path) -> None:
    """``scripts/plan.py --target=tpu-v5e-8``: configs/qwen7b_lora.py exits 0, configs/qwen7b.py exits 1. Compiled
    here: the prefill, the LoRA config's largest peak (13.6 of 16.3 GB usable), over the memory with the full
    update's resident set (float32 weights, two moments, the reference copy); every program's resident buffers
    count, compiled or not. docs/lora.md has all four programs' figures."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    codes = {}
    for name in ("qwen7b", "qwen7b_lora"):
        out = subprocess.run([sys.executable, str(ROOT / "scripts/plan.py"), f"--config={ROOT / 'configs' / name}.py",
                              "--target=tpu-v5e-8", "--programs=sampler/prefill", f"--json={tmp_path / name}.json"],
                             capture_output=True, text=True, env=env, timeout=900)
        codes[name] = out.returncode
        assert out.returncode in (0, 1), out.stderr[-3000:]
    assert codes == {"qwen7b": 1, "qwen7b_lora": 0}
    lora = json.loads((tmp_path / "qwen7b_lora.json").read_text())
    assert "train/ref_params" not in lora["resident_bytes"] and lora["resident_bytes"]["train/base_params"] > 0


@pytest.mark.xdist_group(LEARNING)
def test_arithmetic_config_learns_with_lora(learning_runs) -> None:
    """tests/learning_run.py (its own process, XLA's default optimisation) with rank-8 adapters on every projection
    at a learning rate for adapters, from the full-weight run's start: held-out accuracy rises beyond chance
    (one-sided paired t-test over problems)."""
    from scipy import stats

    before, after = np.asarray(learning_runs["before"]), np.asarray(learning_runs["after"]["lora"])
    assert before.shape == after.shape == (320, 8)
    p = stats.ttest_rel(after.mean(1), before.mean(1), alternative="greater").pvalue
    print(f"LoRA: held-out accuracy {before.mean():.3f} -> {after.mean():.3f} (p = {p:.2g})")
    assert after.mean() - before.mean() > 0.03 and p < 0.01, (before.mean(), after.mean(), p)

