"""A workdir never mixes two runs, and no run silently fails: resume / overwrite rules, the saved config
compared by key, checkpoints verified on restore with a fall back past broken ones, clean exits.

Every test works on a copy of one finished 3-step run (tests/conftest.py ``finished_run``) and goes
through the command line's ``main`` in-process; refusals stop before anything heavy is built, and the
tests that restore reuse the compiled programs of the session, so each takes seconds.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from poer_jax.train import run_dir
from poer_jax.train.__main__ import main
from tests.helpers_runs import argv, snapshot, stagger_orbax_reads


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run: (workdir, its overrides)."""
    w = tmp_path / "run"
    shutil.copytree(finished_run["workdir"], w)
    return w, dict(finished_run["extra"])


def _main(capsys, caplog, env, workdir, extra, **changes) -> tuple[int, str]:
    with caplog.at_level(logging.INFO, logger="poer_jax"):
        rc = main(argv(env, workdir, **{**extra, **changes}))
    return rc, capsys.readouterr().err + caplog.text


def _trainer(env, workdir, extra, **changes):
    from poer_jax.system.config import config_from_argv
    from poer_jax.train.loop import PoerTrainer

    return PoerTrainer(config_from_argv(argv(env, workdir, **{**extra, **changes})))


# ---- what the finished run left ---------------------------------------------------------------------------
def test_finished_run_leaves_summary_samples_and_export_settings(finished_run):
    w = finished_run["workdir"]
    summary = json.loads((w / "summary.json").read_text())
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == summary["max_steps"] == 3
    assert summary["final_eval_accuracy"] == rows[-1]["eval/accuracy"]
    assert summary["initial_eval_accuracy"] == rows[0]["eval/accuracy"]
    assert summary["export"] == str(w / "export") and summary["eval_k"] == 4
    err = finished_run["stderr"]
    assert "held-out accuracy (avg@4, 8 problems)" in err and f"evaluate it: python -m poer_jax.evaluate --model " \
        f"{w / 'export'}" in err
    samples = [json.loads(x) for x in (w / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2]  # train.samples_every=2 over 3 steps
    assert len(samples[0]["completions"]) == 4 and "sample at step 2" in err
    # POER: the group's cached prefix once, then each continuation with its reward and correctness
    prefix = samples[0]["prefix"]
    assert prefix["text"].endswith(prefix["tail"]) and f"  cached prefix: {prefix['length']} tokens" in err
    for c in samples[0]["completions"]:
        assert set(c) == {"continuation", "length", "reward", "correct"} and c["correct"] in (True, False)
        assert f"{'right' if c['correct'] else 'wrong'}] +{c['length']} tokens: " in err
    settings = json.loads((w / "export" / "eval_settings.json").read_text())
    assert settings["system_prompt"] == "Answer in \\boxed{}." and settings["k"] == 4
    assert settings["chat_template"] == "never" and settings["max_new_tokens"] == 24
    recorded = json.loads((w / "run_config.json").read_text())
    assert recorded["rollout"]["group_size"] == 4
    # what was loaded, and which key decided it, printed at the start and recorded (never compared on resume)
    model = recorded["model"]["path"]
    assert recorded["loaded"] == {"model": f"{model} (model.path)", "tokenizer": f"{model} (model.path)",
                                  "train data": f"{recorded['data']['train_path']} (data.train_path)",
                                  "held-out data": f"{recorded['data']['eval_path']} (data.eval_path)"}
    assert f"model: {model} (model.path)" in err


# ---- starting again in the same workdir --------------------------------------------------------------------
def test_rerun_of_a_finished_run_says_already_complete(toy_env, run, capsys, caplog):
    w, extra = run
    before = snapshot(w)
    rc, err = _main(capsys, caplog, toy_env, w, extra)
    assert rc == 0
    assert "already complete" in err and "raise --config.train.max_steps" in err
    assert "held-out accuracy" in err and str(w / "export") in err
    assert snapshot(w) == before


def test_rerun_with_only_resume_safe_changes_is_still_complete(toy_env, run, capsys, caplog):
    w, extra = run
    before = snapshot(w)
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"eval.num_samples": 2, "reward.num_workers": 2})
    assert rc == 0 and "already complete" in err
    assert snapshot(w) == before


INCOMPATIBLE = [
    ("data.questions_per_step", 8, "data.questions_per_step: 4 -> 8"),
    ("rollout.group_size", 6, "rollout.group_size: 4 -> 6"),
    ("optim.learning_rate", 0.02, "optim.learning_rate: 0.01 -> 0.02"),
    ("warm_start.steps", 5, "warm_start.steps: 0 -> 5"),
    ("rollout.max_completion_len", 32, "rollout.max_completion_len: 24 -> 32"),
    ("seed", 1, "seed: 0 -> 1"),
    ("reward.functions", "accuracy", "reward.functions: ("),
    ("cache.max_truncation", 2, "cache.max_truncation: 4 -> 2"),
    ("data.system_prompt", "Think.", "data.system_prompt: 'Answer in \\\\boxed{}.' -> 'Think.'"),
]


@pytest.mark.parametrize("key, value, expect", INCOMPATIBLE, ids=[c[0] for c in INCOMPATIBLE])
def test_resume_refuses_a_change_that_alters_the_run(toy_env, run, capsys, caplog, key, value, expect):
    w, extra = run
    before = snapshot(w)
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"train.max_steps": 5, key: value})
    assert rc == 2, err[-2000:]
    assert "differs in keys that change what it computes" in err and expect in err, err[-2000:]
    assert "--config.overwrite=true" in err
    assert snapshot(w) == before


def test_resume_refuses_another_model_and_data_file(toy_env, run, tmp_path, capsys, caplog):
    w, extra = run
    before = snapshot(w)
    model = tmp_path / "model2"
    shutil.copytree(toy_env["model"], model)
    data = tmp_path / "train2.jsonl"
    shutil.copy(toy_env["train"], data)
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"model.path": model, "data.train_path": data})
    assert rc == 2
    assert f"model.path: '{toy_env['model']}' -> '{model}'" in err and "data.train_path:" in err
    assert snapshot(w) == before


def test_max_steps_below_the_saved_step_is_refused(toy_env, run, capsys, caplog):
    w, extra = run
    before = snapshot(w)
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"train.max_steps": 2})
    assert rc == 2
    assert "'train.max_steps' is 2" in err and "reached step 3" in err and "Traceback" not in err
    assert snapshot(w) == before


def test_resume_false_never_touches_a_run(toy_env, run, capsys, caplog):
    w, extra = run
    before = snapshot(w)
    rc, err = _main(capsys, caplog, toy_env, w, extra, resume=False)
    assert rc == 2
    assert "--config.resume=false" in err and "--config.overwrite=true" in err and "step 3" in err
    assert snapshot(w) == before


def test_overwrite_moves_the_old_run_aside_and_starts_fresh(toy_env, run, capsys, caplog):
    w, extra = run
    # the run's files; a compilation cache in workdir (train.compilation_cache_dir) is a cache and stays
    before = {k: v for k, v in snapshot(w).items() if not k.startswith("jax_cache/")}
    with caplog.at_level(logging.INFO, logger="poer_jax"):
        trainer = _trainer(toy_env, w, extra, overwrite=True, **{"rollout.group_size": 6, "cache.init": "solutions"})
    try:
        assert trainer.step == 0
    finally:
        trainer.close()
    moved = list((w / run_dir.PREVIOUS).iterdir())
    assert len(moved) == 1 and "is now in" in caplog.text
    assert snapshot(moved[0]) == before  # every file of the old run, unchanged
    assert json.loads((w / "run_config.json").read_text())["rollout"]["group_size"] == 6
    assert run_dir.checkpoint_steps(w) == [] and (w / "metrics.jsonl").read_text() == ""


def test_a_move_cut_short_is_finished_before_anything_looks_at_the_workdir(run):
    w, _ = run
    before = snapshot(w)
    dest = w / run_dir.PREVIOUS / "20260101-000000"
    dest.mkdir(parents=True)
    run_dir.write_json(dest / run_dir.MOVING, {"names": ["run_config.json", "checkpoints", "metrics.jsonl"]})
    os.replace(w / "checkpoints", dest / "checkpoints")  # killed after the first rename
    run_dir.finish_interrupted_moves(w)
    assert not (dest / run_dir.MOVING).exists()
    assert not (w / "metrics.jsonl").exists() and not (w / "run_config.json").exists()
    assert snapshot(dest) == {k: v for k, v in before.items()
                              if k.split("/")[0] in ("run_config.json", "checkpoints", "metrics.jsonl")}


def test_resume_safe_changes_are_logged_and_the_run_continues(toy_env, run, caplog):
    w, extra = run
    with caplog.at_level(logging.INFO, logger="poer_jax"):
        trainer = _trainer(toy_env, w, extra, **{"train.max_steps": 5, "eval.num_samples": 2})
    try:
        assert trainer.step == 3
    finally:
        trainer.close()
    assert "resume: train.max_steps: 3 -> 5 (resume-safe)" in caplog.text
    assert "resume: eval.num_samples: 4 -> 2 (resume-safe)" in caplog.text
    assert "learning-rate schedule now spans train.max_steps=5" in caplog.text
    assert "resumed from" in caplog.text


# ---- broken checkpoints ------------------------------------------------------------------------------------
def _break(step_dir: Path, how: str) -> str:
    """Damage one checkpoint step; returns what the warning must say about it."""
    data = sorted(glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    if how == "missing_data_file":
        os.remove(data[-1])
        return "Exception"
    if how == "missing_array_data":  # every array read fails, each at its own time
        for f in data:
            os.remove(f)
        return "Exception"
    if how == "truncated_manifest":
        manifest = step_dir / "state" / "manifest.ocdbt"
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
        return "DATA_LOSS"
    if how == "missing_extra_metadata":
        os.remove(step_dir / "extra" / "metadata")
        return "FileNotFoundError"
    if how == "garbled_bytes":  # decodes to other numbers: non-finite ones, or finite ones only checksums catch
        raw = bytearray(Path(data[-1]).read_bytes())
        mid = len(raw) // 2
        raw[mid: mid + 64] = bytes((b + 1) % 256 for b in raw[mid: mid + 64])
        Path(data[-1]).write_bytes(bytes(raw))
        return "BrokenCheckpointError"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_data_file", "missing_array_data", "truncated_manifest",
                                 "missing_extra_metadata", "garbled_bytes"])
def test_broken_newest_checkpoint_falls_back_to_the_last_intact_one(toy_env, run, caplog, capfd, monkeypatch, how):
    """The fallback warns, moves the broken step aside and resumes from the one before; it prints nothing else
    (no tracebacks of reads orbax left running, poer_jax/train/orbax_loops.py)."""
    import gc
    import sys

    from poer_jax.train.checkpoint import Checkpointer

    unraisable: list[str] = []  # what Python would print as "Exception ignored in: ..."
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(f"{u.object!r}: {u.exc_value!r}"))
    stagger_orbax_reads(monkeypatch)  # reads still running when one fails, every time rather than by chance
    w, extra = run
    with Checkpointer(w / "checkpoints", keep=3) as ckpt:
        expected, _, _ = ckpt.restore(2)
    reason = _break(w / "checkpoints" / "3", how)
    intact = {k: v for k, v in snapshot(w).items() if not k.startswith("checkpoints/3/")}
    with caplog.at_level(logging.INFO, logger="poer_jax"):
        trainer = _trainer(toy_env, w, extra, **{"train.max_steps": 4})
    try:
        assert trainer.start.mode == "resume" and trainer.step == 2
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state.params),
                     jax.device_get(expected["params"]))
    finally:
        trainer.close()
    gc.collect()  # finalise anything a failed read left behind, while the hook still records it
    err = capfd.readouterr().err
    assert unraisable == [] and "Traceback" not in err and "Event loop is closed" not in err, (unraisable, err)
    warning = next(r.getMessage() for r in caplog.records if "is broken" in r.getMessage())
    assert f"step 3 in {w / 'checkpoints'} is broken" in warning and reason in warning
    assert "resuming from step 2" in warning
    broken = list((w / run_dir.BROKEN).iterdir())
    assert [b.name.split("-")[0] for b in broken] == ["3"] and (broken[0] / "BROKEN.txt").is_file()
    assert run_dir.checkpoint_steps(w) == [1, 2]
    after = snapshot(w)
    assert all(after.get(k) == v for k, v in intact.items()
               if not k.startswith(("metrics.jsonl", "samples.jsonl", "run_config.json", "tb/")))


def test_no_intact_checkpoint_is_an_error_that_moves_nothing(toy_env, run, capsys, caplog):
    w, extra = run
    for step in (1, 2, 3):
        _break(w / "checkpoints" / str(step), "missing_extra_metadata")
    before = snapshot(w)
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"train.max_steps": 4})
    assert rc == 2, err[-3000:]
    assert "no checkpoint of workdir" in err.lower() or "No checkpoint of workdir" in err
    for step in (1, 2, 3):
        assert f"step {step}: FileNotFoundError" in err
    assert "--config.overwrite=true" in err and "Event loop is closed" not in err
    assert {k: v for k, v in snapshot(w).items() if k != "run_config.json"} == \
        {k: v for k, v in before.items() if k != "run_config.json"}


# ---- stopping ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signal_exc, code", [("KeyboardInterrupt", 130), ("Terminated", 143)])
def test_interrupt_exits_cleanly_naming_the_checkpoint(toy_env, run, capsys, caplog, monkeypatch, signal_exc, code):
    import poer_jax.train.__main__ as cli
    from poer_jax.train.loop import PoerTrainer

    exc = KeyboardInterrupt if signal_exc == "KeyboardInterrupt" else cli.Terminated
    closed = []
    real_close = PoerTrainer.close

    def interrupted(self):
        raise exc()

    def close(self):
        closed.append(self.checkpointer is not None)
        real_close(self)

    monkeypatch.setattr(PoerTrainer, "train_step", interrupted)
    monkeypatch.setattr(PoerTrainer, "close", close)
    w, extra = run
    before = {k: v for k, v in snapshot(w).items() if k.startswith("checkpoints/")}
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"train.max_steps": 5})
    assert rc == code
    assert "newest checkpoint is step 3: rerun the same command" in err
    assert "Traceback" not in err and "Event loop is closed" not in err
    assert closed and closed[0]  # the checkpointer was open and got closed
    assert {k: v for k, v in snapshot(w).items() if k.startswith("checkpoints/")} == before


def test_a_run_error_exits_3_and_keeps_the_checkpoints(toy_env, run, capsys, caplog, monkeypatch):
    from poer_jax.train.loop import PoerTrainer
    from poer_jax.train.reward_pool import RewardFunctionError

    def failing(self):
        raise RewardFunctionError("reward function 'mine:score' failed on completion 3: ZeroDivisionError")

    monkeypatch.setattr(PoerTrainer, "train_step", failing)
    w, extra = run
    before = {k: v for k, v in snapshot(w).items() if k.startswith("checkpoints/")}
    rc, err = _main(capsys, caplog, toy_env, w, extra, **{"train.max_steps": 5, "reward.on_error": "raise"})
    assert rc == 3
    assert "error: reward function 'mine:score' failed on completion 3" in err and "Event loop" not in err
    assert {k: v for k, v in snapshot(w).items() if k.startswith("checkpoints/")} == before


# ---- the rules themselves, without a run --------------------------------------------------------------------
def test_compare_configs_classifies_by_the_schema():
    from poer_jax.system.config import default_config

    a = default_config().to_dict()
    b = json.loads(json.dumps(a))
    b["train"]["max_steps"] = 500
    b["eval"]["every"] = 7
    b["optim"]["learning_rate"] = 2e-6
    b["workdir"] = "elsewhere"
    del a["reward"]["on_error"]  # a key added since the run started counts as its default there
    refused, allowed = run_dir.compare_configs(a, b)
    assert refused == ["optim.learning_rate: 1e-06 -> 2e-06"]
    assert allowed == ["train.max_steps: 100 -> 500", "eval.every: 0 -> 7"]
    b["reward"]["on_error"] = "raise"
    assert "reward.on_error: 'zero' -> 'raise'" in run_dir.compare_configs(a, b)[1]


def test_failing_rewards_are_loud_once_per_function_and_counted_every_step(caplog):
    """The first traceback of each failing function is logged (once), then a count per step; a cut by the
    step deadline is logged with its count."""
    from types import SimpleNamespace

    from poer_jax.train.loop import PoerTrainer
    from poer_jax.train.reward_pool import RewardResult

    def result(errors: int, cut: int = 0) -> RewardResult:
        n = 8
        first = {"mine": "reward function 'x.py:mine' failed on completion 0: Traceback ...\nValueError: bad"} \
            if errors else {}
        return RewardResult(["accuracy", "mine"], np.ones(2), np.zeros((n, 2)), np.zeros(n), {"accuracy": 0, "mine": 0},
                            {"accuracy": 0, "mine": errors}, {"accuracy": 0, "mine": 0}, first, cut)

    fake = SimpleNamespace(_reported_reward_errors=set(), step=4,
                           cfg=SimpleNamespace(reward=SimpleNamespace(step_timeout_s=120.0)))
    with caplog.at_level(logging.INFO, logger="poer_jax"):
        PoerTrainer._report_reward_problems(fake, result(3))
        fake.step = 5
        PoerTrainer._report_reward_problems(fake, result(8, cut=2))
        PoerTrainer._report_reward_problems(fake, result(0))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "ValueError: bad" in errors[0].getMessage()
    assert "reward.on_error=zero" in errors[0].getMessage()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["step 5: reward function errors: mine on 3 of 8 completions",
                        "step 6: reward function errors: mine on 8 of 8 completions",
                        "step 6: reward.step_timeout_s=120 s passed: 2 reward call(s) not finished got reward 0"]
