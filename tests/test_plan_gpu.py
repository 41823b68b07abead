"""GPU targets compile XLA:GPU's own programs on this CPU host (JAX's CUDA plugin, the ``test`` extra): a small
preset's decode program with the Triton paged-attention kernel and its update step (cuDNN attention where cuDNN is
installed, else the pure-XLA chunked path), for one H100 and for an 8-GPU node; the fit verdict both ways; the
script's exit codes; what the plan says when the plugin or cuDNN is missing; the target names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poer_jax.plan import get_target
from poer_jax.plan import gpu as plan_gpu
from poer_jax.plan.build import plan_config
from poer_jax.plan.compile import PlanError, target_devices
from poer_jax.plan.report import build_report
from poer_jax.system.config import apply_overrides, load_config_file, validate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.preset=tiny-hd128", "model.path=None", "data.train_path=unused.jsonl", "toy.enabled=false",
         "mesh.fsdp=-1", "data.questions_per_step=8", "rollout.group_size=4", "data.max_prompt_len=64",
         "rollout.max_completion_len=192", "model.dtype=bfloat16", "optim.micro_batches=1", "loss.beta=0.0"]
HAS_CUDNN = plan_gpu.plugin_installed() and plan_gpu.cudnn_version() is not None
ATTENTION = "auto" if HAS_CUDNN else "chunked"  # auto is cuDNN on a GPU, which needs cuDNN to compile
needs_plugin = pytest.mark.skipif(not plan_gpu.plugin_installed(), reason=f"no CUDA plugin: {plan_gpu.install_hint()}")
on_cuda = pytest.mark.xdist_group("cuda_plugin")  # the tests that compile for a GPU topology: one worker


def _cfg(*extra: str):
    return validate(apply_overrides(load_config_file(ROOT / "configs/arithmetic.py"),
                                    [*SMALL, f"model.attention={ATTENTION}", *extra]))


def test_gpu_target_names() -> None:
    one, node = get_target("h100-80gb-1"), get_target("h200-141gb-8")
    assert (one.platform, one.num_devices, one.topology) == ("gpu", 1, "1x1x1")
    assert (node.num_devices, node.topology, node.chip.name) == (8, "1x1x8", "H200 141GB")
    two = get_target("2x h100-80gb-8")
    assert (two.name, two.num_devices, two.topology) == ("2x h100-80gb-8", 16, "2x1x8")
    assert get_target("4xh200-141gb-8").num_devices == 32
    with pytest.raises(KeyError, match="Nx <gpu target>"):
        get_target("2x tpu-v5p-8")  # nodes of a TPU slice are its topology, not a count
    text = plan_gpu.target_config(one.chip)
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text and "major: 9" in text
    assert "memory_bandwidth: 4800000000000" in plan_gpu.target_config(node.chip)


def test_missing_plugin_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setattr(plan_gpu, "plugin_installed", lambda: False)
    with pytest.raises(PlanError, match=r"CUDA plugin, which is not installed: pip install \"jax\[cuda12-local\]=="):
        target_devices(get_target("h100-80gb-8"))


@needs_plugin
@on_cuda
def test_missing_cudnn_says_how_to_install_it_or_avoid_it(monkeypatch) -> None:
    monkeypatch.setattr(plan_gpu, "cudnn_version", lambda: None)
    cfg = validate(apply_overrides(_cfg(), ["model.attention=auto"]))
    with pytest.raises(PlanError, match=r"nvidia-cudnn-cu12.*model.attention=chunked"):
        plan_config(cfg, get_target("h100-80gb-1"), num_questions=64, programs=["train/update"])


@needs_plugin
@on_cuda
@pytest.mark.parametrize("target", ["h100-80gb-1", "h100-80gb-8"])
def test_gpu_plan_compiles_the_gpu_programs_and_judges_both_ways(target: str) -> None:
    t = get_target(target)
    report = plan_config(_cfg(), t, num_questions=64, programs=["sampler/decode", "train/update"])
    assert report.fits and report.device_kind == "NVIDIA H100 80GB HBM3"
    assert report.compiler == "XLA:GPU, compiled, not autotuned"
    data = json.loads(json.dumps(report.to_json()))
    assert data["device_kind"] == "NVIDIA H100 80GB HBM3" and data["platform"] == "gpu"
    decode, update = report.programs
    # the GPU's choices: the Triton kernel over split pools, a layer scan (not the CPU's unrolled layers)
    assert dict(decode.cost.calls.kernels).get("paged attention (triton)", 0) > 0
    assert any(lp.trip == 2 for lp in decode.cost.calls.loops)  # the layer scan of the 2-layer preset
    kernels = dict(update.cost.calls.kernels)
    assert (kernels.get("cudnn attention backward", 0) > 0) == HAS_CUDNN
    assert update.cost.temp_bytes > 0 and update.cost.flops > update.cost.calls.xla_flops > 0
    # the same compiled programs judged against a budget they exceed
    specs = _specs(report, t)
    tight = build_report(t, specs, [p.cost for p in report.programs],
                         memory_fraction=decode.peak_bytes / 2 / t.chip.memory_bytes)
    assert not tight.fits and f"sampler/decode does not fit on {target}" in tight.failures()[0]


def _specs(report, target):
    from poer_jax.plan.build import program_specs
    from poer_jax.system.mesh import mesh_for
    from poer_jax.system.model import model_shapes

    cfg = _cfg()
    mcfg, _ = model_shapes(cfg)
    specs, _, _ = program_specs(cfg, mcfg, mesh_for(cfg, target_devices(target)), 64)
    return [next(s for s in specs if s.name == p.name) for p in report.programs]


@needs_plugin
@on_cuda
def test_plan_script_on_a_gpu_target_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, str(ROOT / "scripts/plan.py"), f"--config={ROOT / 'configs/arithmetic.py'}",
            *(f"--config.{o}" for o in SMALL), f"--config.model.attention={ATTENTION}", "--num-questions=64",
            "--target=h100-80gb-1", "--programs=sampler/decode"]
    # a pool of 12M pages (~100 GB) cannot fit one 80 GB card: exit 1, naming the program and the keys
    out = subprocess.run([*base, "--config.rollout.num_pages=12000000", f"--json={tmp_path / 'plan.json'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sampler/decode does not fit on h100-80gb-1" in out.stdout and "rollout.num_pages" in out.stdout
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["fits"] is False and data["device_kind"] == "NVIDIA H100 80GB HBM3"
