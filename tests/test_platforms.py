"""The platforms a command starts when JAX_PLATFORMS is unset (``poer_jax.platforms``): installed plugins without
their hardware are left out, so a CPU host with the ``test`` extra (libtpu and JAX's CUDA plugin) starts quietly;
checked in a fresh process without JAX_PLATFORMS, as a user's command runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

from poer_jax import platforms

ROOT = Path(__file__).resolve().parents[1]
NONE = {"cuda": False, "rocm": False, "tpu": False}


def test_present_platforms_keep_the_hardware_that_is_here() -> None:
    def present(installed: dict, hardware: dict) -> str | None:
        return platforms.present_platforms({**NONE, **installed}, {**NONE, **hardware})

    assert present({}, {}) is None  # nothing installed: JAX's own choice (the CPU)
    assert present({"cuda": True, "tpu": True}, {}) == "cpu"  # this CI machine with the test extra
    assert present({"cuda": True, "tpu": True}, {"cuda": True}) == "cuda,cpu"  # a GPU host with the test extra
    assert present({"cuda": True, "tpu": True}, {"tpu": True}) == "tpu,cpu"  # a TPU VM with the test extra
    assert present({"cuda": True}, {"cuda": True}) is None  # a GPU host with jax[cuda12]


def test_a_user_choice_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert platforms.use_present_platforms() is None
    monkeypatch.delenv("JAX_PLATFORMS")
    before = jax.config.jax_platforms
    try:
        jax.config.update("jax_platforms", "cpu")
        assert platforms.use_present_platforms() is None
    finally:
        jax.config.update("jax_platforms", before)


def test_a_command_without_jax_platforms_starts_quietly_on_the_cpu() -> None:
    """What the README's demo and ``evaluate`` do before JAX starts, in a process like theirs: no CUDA checks, no
    TPU runtime, nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("from poer_jax.platforms import use_present_platforms; chosen = use_present_platforms(); "
            "import jax; print(chosen, jax.devices()[0].platform)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    expected = platforms.present_platforms()
    assert out.stdout.split() == [str(expected), "cpu"]
    assert out.stderr == "", out.stderr


def test_evaluate_starts_quietly_without_jax_platforms(tmp_path: Path) -> None:
    """``python -m poer_jax.evaluate`` on a missing model directory: the user's error, and no plugin noise."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "poer_jax.evaluate", "--model", str(tmp_path / "absent")],
                         capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.returncode != 0
    noise = [line for line in out.stderr.splitlines()
             if any(w in line for w in ("cuda", "CUDA", "libtpu", "TPU", "cudart", "absl::InitializeLog"))]
    assert not noise, out.stderr
