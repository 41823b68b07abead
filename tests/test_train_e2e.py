"""The training entry point end to end on a tiny model and a tiny math dataset (CPU).

Runs share one generated environment (tiny tokenizer, toy data, tiny random Qwen2) and, in-process,
the sampler's compiled programs; the command line, SIGKILL and device-count checks run as subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from poer_jax.system.config import apply_overrides, default_config, validate
from tests.helpers_runs import HELPERS, ROOT, xla_flags
from tests.helpers_runs import cli as _cli
from tests.helpers_runs import metrics as _metrics
from tests.helpers_runs import overrides as _overrides
from tests.helpers_runs import run_cli as _run_cli


def _config(env, workdir, **extra):
    return validate(apply_overrides(default_config(), _overrides(env, workdir, **extra)))


TIME_KEYS = ("time/", "tokens/decoded_per_s", "eval/time_s")


# the share of decode rows that made a token depends on how the groups were laid out over devices (each device's
# decode loop, and its tail of fewer rows, runs its own rows): not a property of the samples
LAYOUT_KEYS = ("rollout/row_utilisation",)


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIME_KEYS) and k not in LAYOUT_KEYS} for r in rows]


REQUIRED = ["reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "completions/mean_length",
            "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "tokens/prefilled", "tokens/decoded",
            "tokens/decoded_full_equiv", "time/rollout_s", "time/update_s", "cache/mean_length",
            "logp_diff/sampler_vs_trainer", "rollout/decode_steps", "rollout/continuation_p50",
            "rollout/continuation_p95", "rollout/continuation_max", "rollout/row_utilisation", "time/prefill_s",
            "time/decode_s", "time/rollout_host_s"]


@pytest.mark.slow
def test_poer_and_grpo_from_the_command_line(toy_env, finished_run, tmp_path):
    """The shared finished POER run (conftest.py) against a GRPO run; the README's evaluate command on the
    POER run's export reports the held-out accuracy (and mean length: the same samples) the run printed."""
    poer_dir = finished_run["workdir"]
    g = _run_cli(toy_env, tmp_path / "grpo", **{"rollout.strategy": "full"})
    assert g.returncode == 0, g.stderr[-3000:]
    poer, grpo = _metrics(poer_dir), _metrics(tmp_path / "grpo")
    train_rows = [m for m in poer if m["step"] > 0]
    assert [m["step"] for m in train_rows] == [1, 2, 3]
    for key in REQUIRED:
        assert all(key in m for m in train_rows), key
    assert "kl" not in train_rows[0] or np.isfinite(train_rows[0]["kl"])
    assert "eval/accuracy" in poer[0] and "eval/accuracy" in poer[-1]
    dec_poer = sum(m["tokens/decoded"] for m in train_rows)
    dec_grpo = sum(m["tokens/decoded"] for m in grpo)
    assert dec_poer < 0.5 * dec_grpo, (dec_poer, dec_grpo)
    assert all(m["tokens/decoded_full_equiv"] > m["tokens/decoded"] for m in train_rows)
    for m in train_rows + [m for m in grpo if m["step"] > 0]:  # the loop runs until the longest sample stops
        assert m["rollout/decode_steps"] >= m["rollout/continuation_max"] - 1, m
        assert 0 < m["rollout/row_utilisation"] <= 1
        assert m["time/prefill_s"] + m["time/decode_s"] <= m["time/rollout_s"]
    assert (poer_dir / "checkpoints").is_dir()
    assert list((poer_dir / "tb").glob("events*"))
    assert max(m["grad_norm"] for m in train_rows) > 0  # the policy moved: the export is not the initial model
    ev = subprocess.run([sys.executable, "-m", "poer_jax.evaluate", "--model", str(poer_dir / "export"),
                         "--json", str(tmp_path / "ev.json")],
                        capture_output=True, text=True, timeout=300, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()})
    assert ev.returncode == 0, ev.stderr[-3000:]
    got = json.loads((tmp_path / "ev.json").read_text())
    assert got["num_problems"] == 8 and got["k"] == 4
    assert got["avg@4"] == poer[-1]["eval/accuracy"]
    assert got["mean_length"] == poer[-1]["eval/mean_length"]


@pytest.mark.slow
def test_exact_resume_after_sigkill(toy_env, finished_run, tmp_path):
    """The shared finished run's command (conftest.py), killed with SIGKILL once it has checkpointed a random
    step and rerun, ends with the finished run's metrics (held-out evals included) and train state."""
    steps, extra = 3, finished_run["extra"]
    ref = tmp_path / "ref"
    shutil.copytree(finished_run["workdir"], ref)
    # kill once it has committed the checkpoint of a random step (fixed seed for the draw). Its metrics row is
    # written before the checkpoint, which is saved asynchronously, so the wait is on the checkpoint itself: orbax
    # writes a step to a temporary directory and renames it to the bare step number when it is complete.
    kill_after = int(np.random.default_rng(0).integers(1, steps))
    args, env_vars = _cli(toy_env, tmp_path / "run", **extra)
    proc = subprocess.Popen(args, env=env_vars, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= kill_after for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _run_cli(toy_env, tmp_path / "run", **extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert _comparable(_metrics(tmp_path / "run")) == _comparable(_metrics(ref))
    from poer_jax.train.checkpoint import Checkpointer

    sa, pa, _ = Checkpointer(ref / "checkpoints", keep=5).restore()
    sb, pb, _ = Checkpointer(tmp_path / "run" / "checkpoints", keep=5).restore()
    import jax

    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sa["params"]), jax.device_get(sb["params"]))
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    # resuming with another dataset (so another cache pool) is refused before anything is loaded
    other = _run_cli(toy_env, ref, **{**extra, "train.max_steps": steps + 1, "data.limit": 20})
    assert other.returncode == 2 and "data.limit: None -> 20" in other.stderr, other.stderr[-3000:]


def _assert_same_metrics(a_rows: list[dict], b_rows: list[dict]) -> None:
    a_rows, b_rows = _comparable(a_rows), _comparable(b_rows)
    assert [m["step"] for m in a_rows] == [m["step"] for m in b_rows]
    for a, b in zip(a_rows, b_rows, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-4, err_msg=f"step {a['step']}: {k}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(env, workdir, **extra) -> list[subprocess.CompletedProcess]:
    """The same command as two JAX processes with 4 CPU devices each (a 2-host job on one machine)."""
    args, env_vars = _cli(env, workdir, **extra)
    port = _free_port()
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **env_vars, "XLA_FLAGS": xla_flags(4), "JAX_NUM_PROCESSES": "2",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    return out


@pytest.mark.slow
def test_eight_devices_and_two_processes_equal_one_device(toy_env, tmp_path):
    """Must show 5 (mesh data x fsdp on 8 devices) and the multi-host path: two processes x 4 devices, each
    sampling its own questions on its own devices, give the metrics of one device; so does a two-process
    run resumed after losing its last checkpoint."""
    run = {"train.max_steps": 2, "eval.enabled": True, "eval.every": 2, "train.export_final": True}
    mesh = {"mesh.num_devices": 0, "mesh.data": 2, "mesh.fsdp": -1}
    one = _run_cli(toy_env, tmp_path / "one", **run)
    assert one.returncode == 0, one.stderr[-3000:]
    args, env_vars = _cli(toy_env, tmp_path / "eight", **run, **mesh)
    env_vars["XLA_FLAGS"] = xla_flags(8)
    eight = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env_vars, cwd=ROOT)
    assert eight.returncode == 0, eight.stderr[-3000:]
    m1 = _metrics(tmp_path / "one")
    assert "eval/accuracy" in m1[0] and "eval/accuracy" in m1[-1]
    _assert_same_metrics(m1, _metrics(tmp_path / "eight"))

    two = tmp_path / "two"
    for i, r in enumerate(_run_two_processes(toy_env, two, **run, **mesh)):
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"process {i} of 2: samples 2 of the 4 questions of a step on its 4 devices" in r.stderr
    _assert_same_metrics(m1, _metrics(two))
    from safetensors.numpy import load_file

    w1 = load_file(tmp_path / "one" / "export" / "model.safetensors")
    w2 = load_file(two / "export" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # lose the last checkpoint (a crash before it was committed): the resumed run redoes step 2 identically
    shutil.rmtree(two / "checkpoints" / "2")
    resumed = _run_two_processes(toy_env, two, **run, **mesh)
    for r in resumed:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stderr and "at step 1" in r.stderr
    _assert_same_metrics(m1, _metrics(two))
    # a batch that does not split over the processes: a clear error on each, no hang
    for r in _run_two_processes(toy_env, tmp_path / "bad", **{**run, **mesh, "data.questions_per_step": 3}):
        assert r.returncode == 2 and "data.questions_per_step" in r.stderr, r.stderr[-3000:]


def test_hanging_reward_is_cut_off_and_nonfinite_update_is_skipped(toy_env, tmp_path, caplog, monkeypatch):
    """A user reward that hangs is cut off at its deadline; NaN and inf rewards are counted alike and given 0;
    a non-finite loss (here: NaN advantages on the first step) skips the update (logged, parameters unchanged)
    and nothing non-finite reaches a checkpoint or metrics.jsonl (the skipped step's loss is left out, named
    in a warning)."""
    import jax

    import poer_jax.train.loop as loop_mod
    from poer_jax.train.checkpoint import Checkpointer

    real = loop_mod.group_advantages
    calls = []

    def nan_first(rewards, **kw):
        calls.append(1)
        adv = real(rewards, **kw)
        return adv * np.nan if len(calls) == 1 else adv

    monkeypatch.setattr(loop_mod, "group_advantages", nan_first)
    cfg = _config(toy_env, tmp_path / "w", **{
        "reward.functions": f"accuracy,{HELPERS}:hang_sometimes,{HELPERS}:infinite_reward,{HELPERS}:nan_on_odd_ids",
        "reward.timeout_s": 1.0, "train.max_steps": 2})
    trainer = loop_mod.PoerTrainer(cfg)
    before = jax.device_get(trainer.state.params)
    with caplog.at_level("WARNING", logger="poer_jax"):
        first = trainer.train_step()
        trainer._write_metrics(trainer.step, first)
    assert first["skipped"] == 1 and not np.isfinite(first["loss"])
    # the two functions return inf / NaN on the same completions (odd sum of token ids), unless one timed out
    odd = first["rewards/infinite_reward/non_finite"]
    assert odd > 0 and first["rewards/nan_on_odd_ids/non_finite"] == odd
    assert first["rewards/non_finite"] == 2 * odd
    assert first["rewards/nan_on_odd_ids/mean"] == 1.0 and first["rewards/infinite_reward/mean"] == 0.0
    assert "non-finite loss or gradient" in caplog.text
    assert "NaN / inf rewards (given 0, counted in rewards/non_finite): infinite_reward on" in caplog.text
    assert "step 1: non-finite metrics left out of metrics.jsonl: " in caplog.text
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(trainer.state.params))
    last = trainer.run()  # the second step trains normally and checkpoints
    assert last["skipped"] == 0
    assert first["rewards/hang_sometimes/timeouts"] + last["rewards/hang_sometimes/timeouts"] >= 1
    state, _, _ = Checkpointer(tmp_path / "w" / "checkpoints", keep=2).restore()
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(state["params"]))
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "loss" not in rows[0] and "loss" in rows[1]
    for row in rows:
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in row.values()), row


def test_dynamic_sampling_keeps_groups_with_spread_and_fails_clearly(toy_env, tmp_path):
    from poer_jax.rl import DynamicSamplingError
    from poer_jax.train.loop import PoerTrainer

    cfg = _config(toy_env, tmp_path / "w", **{
        "reward.functions": f"{HELPERS}:spread_on_even_answers", "reward.dynamic_sampling": True,
        "reward.max_sampling_attempts": 8, "train.max_steps": 1, "reward.length_aware": False})
    trainer = PoerTrainer(cfg)
    try:
        m = trainer.train_step()
        assert m["dynamic_sampling/attempts"] >= 1 and m["frac_reward_zero_std"] == 0.0
        assert m["completions/mean_length"] > 0
        bad = _config(toy_env, tmp_path / "w2", **{
            "reward.functions": "accuracy", "reward.dynamic_sampling": True, "reward.max_sampling_attempts": 2,
            "reward.length_aware": False})
        t2 = PoerTrainer(bad)  # an untrained model answers nothing right: no group ever has a spread
        try:
            with pytest.raises(DynamicSamplingError, match="2"):
                t2.train_step()
        finally:
            t2.rewards.close()
    finally:
        trainer.rewards.close()
