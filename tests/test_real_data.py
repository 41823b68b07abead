"""A small open-rs-format file (problem / solution / answer; LaTeX and plain-text answers, words, a pair, an
interval, units) through the grader, ``python -m poer_jax.evaluate`` and two training steps of the command line.

tests/assets/open_rs_sample.jsonl: 12 competition-style rows whose ``answer`` column is written as such answer keys
write it (``sqrt(3)``, ``2^(n-1)``, ``n(n+1)*2^(n-2)``, ``No``, ``10 cm``) and whose ``solution`` boxes the LaTeX.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from poer_jax.rewards.answers import extract_last_boxed, grade_completion
from poer_jax.system.data import load_dataset_file
from tests.helpers_runs import FINISHED_RUN, ROOT, run_cli, xla_flags

ASSET = ROOT / "tests" / "assets" / "open_rs_sample.jsonl"
# a wrong answer per row, each a near miss of its gold
WRONG = ["sqrt(3)/3", "2^n-1", "(n+1)^n", "1-2^{1/n}", "n(n+1)2^{n-1}", "\\frac{4}{3}", "Yes", "(2,1)", "[0,1]",
         "10 m", "-2", "2\\sqrt{2}"]
ROWS = load_dataset_file(ASSET).rows


def _completion(answer: str) -> str:
    return f"We work it out.\n</think>\nThe answer is $\\boxed{{{answer}}}$."


def test_each_gold_boxed_scores_1_and_a_wrong_answer_0():
    assert len(ROWS) == len(WRONG) == 12
    for row, wrong in zip(ROWS, WRONG, strict=True):
        for gold in (row["answer"], extract_last_boxed(row["solution"])):
            assert grade_completion(_completion(gold), row["solution"], row["answer"]).correct is True, gold
        assert grade_completion(_completion(wrong), row["solution"], row["answer"]).correct is False, wrong


def test_evaluate_grades_as_the_training_reward_does(toy_env, tmp_path, monkeypatch, capsys):
    """``poer_jax.evaluate`` (its ``main``, with a sampler that answers each problem with its gold, then a wrong
    answer) scores the golds 1 and the wrong answers 0, exactly as the training run's reward pool does."""
    import poer_jax.sampler
    from poer_jax.evaluate import main
    from poer_jax.system.config import default_config
    from poer_jax.system.text import load_tokenizer
    from poer_jax.train.reward_setup import build_rewards

    tokenizer = load_tokenizer(toy_env["model"])
    answers = [[_completion(r["answer"]), _completion(w)] for r, w in zip(ROWS, WRONG, strict=True)]

    class AnsweringSampler:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, k, max_new_tokens, key, sampling=None, group_offset=0):
            ids = []
            for g, prompt in enumerate(prompts):
                row = group_offset + g
                assert ROWS[row]["problem"] in tokenizer.decode(prompt), (row, tokenizer.decode(prompt))
                ids += [tokenizer(answers[row][i], add_special_tokens=False)["input_ids"] for i in range(k)]
            tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
            for s, x in enumerate(ids):
                tokens[s, : len(x)] = x
            return SimpleNamespace(tokens=tokens, lengths=np.asarray([len(x) for x in ids], np.int32))

    monkeypatch.setattr(poer_jax.sampler, "GroupSampler", AnsweringSampler)
    out = tmp_path / "eval.json"
    rc = main(["--model", toy_env["model"], "--data", str(ASSET), "--k", "2", "--chat-template", "never",
               "--system-prompt", "Answer in \\boxed{}.", "--max-prompt-len", "128", "--max-new-tokens", "64",
               "--batch-size", "5", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["per_problem_correct"] == [[1, 0]] * len(ROWS) and res["avg@2"] == 0.5 and res["pass@2"] == 1.0

    cfg = default_config()
    cfg.reward.functions, cfg.reward.num_workers = ("accuracy", "format"), 1
    rewards, grader = build_rewards(cfg)
    try:
        assert grader is rewards  # the run's held-out evaluation grades with the training pool's accuracy
        flat = [c for pair in answers for c in pair]
        cols = {k: [r[k] for r in ROWS for _ in range(2)] for k in ("solution", "answer")}
        got = rewards.compute([""] * len(flat), flat, columns=cols)
    finally:
        rewards.close()
    assert got["accuracy"].reshape(-1, 2).astype(int).tolist() == res["per_problem_correct"]


@pytest.mark.slow
def test_the_file_trains_two_steps_from_the_command_line_and_evaluates(toy_env, tmp_path):
    """Two POER steps on the file (training data, and its first 8 rows held out) with the accuracy and format
    rewards, then ``python -m poer_jax.evaluate`` on the exported model and every row: both finish, the metrics
    are finite numbers, every completion is graded."""
    w = tmp_path / "run"
    # the finished run's settings (tests/conftest.py), and as many held-out rows: its compiled programs are reused
    r = run_cli(toy_env, w, **{**FINISHED_RUN, "data.train_path": str(ASSET), "data.eval_path": str(ASSET),
                               "data.eval_limit": 8, "train.max_steps": 2})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2]
    for row in rows:
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in row.values()), row
    assert all(x["rewards/accuracy/count"] == 16 for x in rows[1:])  # every completion of the step graded
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert "sample at step 2" in r.stderr and "  cached prefix: " in r.stderr  # POER's view of a group
    out = tmp_path / "eval.json"
    e = subprocess.run([sys.executable, "-m", "poer_jax.evaluate", "--model", str(w / "export"), "--data", str(ASSET),
                        "--k", "2", "--temperature", "1.0", "--max-new-tokens", "16", "--max-prompt-len", "128",
                        "--chat-template", "never", "--system-prompt", "Answer in \\boxed{}.",
                        "--limit", str(len(ROWS)), "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()})
    assert e.returncode == 0, e.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["num_problems"] == len(ROWS) and np.asarray(res["per_problem_correct"]).shape == (len(ROWS), 2)
