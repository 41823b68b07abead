"""Tiny training runs for the end-to-end and run-rule tests: the overrides of a run on the toy environment
(tests/conftest.py's ``toy_env``), the command line, and a snapshot of a workdir's files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers_rewards.py"
# The arithmetic config's own warm start (500 supervised steps on 1,000 training rows), committed so that the tests
# starting from it skip minutes of supervised training; remake it with
#   PYTHONPATH=. python scripts/warm_start.py --config=configs/arithmetic.py --out tests/assets/warm_start_arithmetic
#       --rows 0 --target-accuracy 0 --eval-k 0 --config.toy.num_train=1000
ARITHMETIC_WARM_START = ROOT / "tests" / "assets" / "warm_start_arithmetic"
# The command-line runs of the tests are a few steps of a tiny model: XLA's compiles are most of their time, and
# LLVM at -O0 takes about a third less (their slower code costs nothing at this size). Every subprocess whose
# numbers a test compares with another's uses these flags (the persistent compilation cache keys on them too).
RUN_XLA_FLAGS = "--xla_backend_optimization_level=0"
# The overrides of the session's finished run (tests/conftest.py ``finished_run``), on top of ``overrides``'s.
FINISHED_RUN = {"eval.enabled": True, "eval.every": 3, "train.export_final": True, "train.samples_every": 2,
                "train.keep_checkpoints": 3, "optim.learning_rate": 0.01}


LEARNING = "learning"  # the xdist group of the tests that read conftest.learning_runs: one worker makes and reads it

def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` of a test's subprocess: ``RUN_XLA_FLAGS``, with ``devices`` host CPU devices if given."""
    return RUN_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


def overrides(env: dict, workdir: Path, **extra) -> list[str]:
    """``KEY=VALUE`` strings of a 3-step run (4 questions x G 4, 24 tokens) on one device; ``extra`` keys
    may use ``__`` for ``.``."""
    base = {
        "workdir": str(workdir), "model.path": env["model"], "data.train_path": env["train"],
        "data.eval_path": env["test"], "data.chat_template": "never", "data.system_prompt": "Answer in \\boxed{}.",
        "data.max_prompt_len": 128, "data.questions_per_step": 4, "rollout.group_size": 4,
        "rollout.max_completion_len": 24, "rollout.temperature": 1.0, "rollout.page_size": 8,
        "cache.max_truncation": 4, "reward.functions": "accuracy,format", "reward.num_workers": 1,
        "reward.length_aware": True, "reward.length_variant": "correct_only", "loss.beta": 0.0,
        "optim.learning_rate": 1e-3, "train.max_steps": 3, "train.checkpoint_every": 1, "eval.enabled": False,
        "eval.max_new_tokens": 24, "mesh.num_devices": 1, "train.export_final": False,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def argv(env: dict, workdir: Path, **extra) -> list[str]:
    """The arguments of ``python -m poer_jax.train`` (after the module name) for this run."""
    return [f"--config={ROOT / 'configs' / 'arithmetic.py'}", "--config.toy.enabled=false",
            "--config.warm_start.steps=0",
            *(f"--config.{o}" for o in overrides(env, workdir, **extra))]


def cli(env: dict, workdir: Path, **extra) -> tuple[list[str], dict[str, str]]:
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    return [sys.executable, "-m", "poer_jax.train", *argv(env, workdir, **extra)], env_vars


def run_cli(env: dict, workdir: Path, timeout: int = 600, **extra) -> subprocess.CompletedProcess:
    args, env_vars = cli(env, workdir, **extra)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env_vars, cwd=ROOT)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``directory`` ({} when it does not exist)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def stagger_orbax_reads(monkeypatch, step_s: float = 0.01) -> None:
    """Make orbax's array reads finish in the order they start, ``step_s`` apart: when one of them fails, the
    later ones are still running, as they are (by chance) on a loaded machine. Orbax then leaves them behind
    unless its event loop is drained (poer_jax/train/orbax_loops.py); this makes that case happen every time."""
    import asyncio

    from orbax.checkpoint._src.serialization import serialization

    read = serialization._read_shard
    started = [0]

    async def staggered(*args, **kwargs):
        started[0] += 1
        await asyncio.sleep(step_s * started[0])
        return await read(*args, **kwargs)

    monkeypatch.setattr(serialization, "_read_shard", staggered)
