"""Evaluation: avg@k / pass@k from graded completions on a file with known answers, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from poer_jax.eval.evaluator import EvalResult, grade
from poer_jax.eval.passk import pass_at_k
from poer_jax.system.data import load_dataset_file
from poer_jax.train.reward_pool import RewardPool
from tests.helpers_runs import xla_flags

ROOT = Path(__file__).resolve().parents[1]

# MATH-500 / AIME style rows (problem + answer), and k = 3 completions per problem with known correctness
ROWS = [{"problem": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}"},
        {"problem": "Solve x^2 = 9 for x > 0.", "answer": "3"},
        {"problem": "Compute 7 * 8.", "answer": "56"}]
COMPLETIONS = [["so \\boxed{3/4}", "\\boxed{0.75}", "\\boxed{1/2}"],       # right, right, wrong
               ["x = \\boxed{-3}", "no box here: 3", "\\boxed{4}"],          # all wrong
               ["\\boxed{56}", "\\boxed{56}", "7*8 = \\boxed{56}"]]          # all right
EXPECTED = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)


def test_avg_and_pass_at_k_on_a_file_with_known_answers(tmp_path):
    f = tmp_path / "math500.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = load_dataset_file(f)
    with RewardPool(["accuracy"], num_workers=1, timeout_s=10.0) as grader:
        correct = grade(grader, COMPLETIONS, [r.get("solution") for r in data.rows], [r["answer"] for r in data.rows])
    np.testing.assert_array_equal(correct, EXPECTED)
    m = EvalResult(correct=correct, completions=COMPLETIONS, lengths=np.ones((3, 3)), seconds=0.0).metrics("")
    assert m["accuracy"] == pytest.approx(5 / 9)  # avg@3
    assert m["pass@1"] == pytest.approx(5 / 9)
    assert m["pass@3"] == pytest.approx(2 / 3)
    assert m["pass@3"] == pytest.approx(float(np.mean(pass_at_k([3, 3, 3], [2, 0, 3], 3))))


def test_evaluate_cli_on_a_model_directory(toy_env_model, tmp_path):
    model_dir, test_file = toy_env_model
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "poer_jax.evaluate", "--model", str(model_dir), "--data", str(test_file),
                        "--k", "2", "--temperature", "1.0", "--max-new-tokens", "16", "--max-prompt-len", "128",
                        "--chat-template", "never", "--system-prompt", "Answer in \\boxed{}.", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "avg@2" in r.stdout and "pass@2" in r.stdout
    res = json.loads(out.read_text())
    per = np.asarray(res["per_problem_correct"], float)
    assert per.shape == (res["num_problems"], 2)
    assert res["avg@2"] == pytest.approx(per.mean())
    assert res["pass@2"] == pytest.approx(float(np.mean(pass_at_k(2, per.sum(1).astype(int), 2))))


def test_evaluate_cli_bad_data_file(toy_env_model, tmp_path):
    model_dir, _ = toy_env_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')
    r = subprocess.run([sys.executable, "-m", "poer_jax.evaluate", "--model", str(model_dir), "--data", str(bad)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()})
    assert r.returncode == 2 and "bad.jsonl" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def toy_env_model(toy_env):
    """The session's tiny toy model (tests/conftest.py) and its held-out file."""
    return Path(toy_env["model"]), Path(toy_env["test"])
