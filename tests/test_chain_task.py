"""The chain task (the demo's long-answer task) and the tiny tokenizer's word tokens."""

from __future__ import annotations

import re

import pytest

from poer_jax.rewards.answers import grade_completion
from poer_jax.rewards.functions import format_reward
from poer_jax.tasks import TASKS, make_task_splits, task_capacity, task_completion
from poer_jax.tasks.chain import (
    ChainTaskConfig,
    chain_completion,
    chain_error,
    chain_row,
    generate_chain_rows,
    make_chain_splits,
    num_chain_problems,
)
from poer_jax.tasks.tiny_tokenizer import load_tiny_tokenizer, make_tiny_tokenizer

STEP = re.compile(r"(\d\d):(\d)\+(\d)\+(\d)=(\d)")
PROBLEM = re.compile(r"Start (\d) (\d), add (\d), (\d+) steps\.")


@pytest.fixture(scope="module")
def splits():
    return make_chain_splits(300, 60, seed=3, cfg=ChainTaskConfig(min_steps=14, max_steps=22))


def test_rows_are_deterministic_distinct_and_worked_step_by_step(splits):
    train, test = splits
    assert (train, test) == make_chain_splits(300, 60, seed=3, cfg=ChainTaskConfig(min_steps=14, max_steps=22))
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for row in train + test:
        a, b, k, n = (int(x) for x in PROBLEM.fullmatch(row["problem"]).groups())
        steps = STEP.findall(row["solution"])
        assert 14 <= n <= 22 and len(steps) == n
        for i, (left, x, y, kk, c) in enumerate(steps):  # a plain re-derivation of x_{i+1} = x_{i-1} + x_i + k
            assert (int(left), int(x), int(y), int(kk)) == (n - i, a, b, k)
            a, b = b, (a + b + k) % 10
            assert int(c) == b
        assert row["answer"] == f"{a}{b}" and row["solution"].endswith(f"\\boxed{{{a}{b}}}")


def test_one_wrong_digit_anywhere_changes_the_answer():
    """The property the docstring claims: the answer depends on every step (no single error cancels)."""
    for a, b, k, n in ((3, 8, 2, 30), (0, 0, 0, 45), (5, 5, 5, 61)):
        right = chain_row(a, b, k, n)["answer"]
        for i in range(n):
            for e in range(1, 10):
                x, y = a, b
                for j in range(n):
                    x, y = y, (x + y + k + (e if j == i else 0)) % 10
                assert f"{x}{y}" != right, (a, b, k, n, i, e)


def test_knobs_and_bad_values():
    rows = make_task_splits("chain", 50, 0, seed=0, max_value=2, min_operands=3, max_operands=4)[0]
    for row in rows:
        a, b, k, n = (int(x) for x in PROBLEM.fullmatch(row["problem"]).groups())
        assert 3 <= n <= 4 and 0 <= k <= 2
    for bad in (dict(min_steps=1), dict(min_steps=5, max_steps=4), dict(max_steps=100), dict(max_constant=10)):
        with pytest.raises(ValueError, match="chain task"):
            ChainTaskConfig(**bad)
    small = ChainTaskConfig(min_steps=2, max_steps=2, max_constant=0)
    assert num_chain_problems(small) == 100 and len(generate_chain_rows(100, 0, small)) == 100
    with pytest.raises(ValueError, match="allow only 100"):
        generate_chain_rows(101, 0, small)
    assert task_capacity("chain", max_value=1, min_operands=14, max_operands=22) == 100 * 2 * 9
    assert task_capacity("arithmetic", max_value=9, min_operands=2, max_operands=3) is None


def test_completion_is_graded_right_and_is_160_to_250_tokens_at_the_demo_setting(splits, tmp_path):
    train, _ = splits
    for row in train[:5]:  # math-verify is ~10 ms a pair
        c = task_completion("chain", row)
        assert c == chain_completion(row) and c.endswith(f"\n</think>\n\\boxed{{{row['answer']}}}")
        assert grade_completion(c, row["solution"], row["answer"]).correct is True
        assert format_reward([c]) == [1.0]
    corpus = [r["problem"] for r in train] + [chain_completion(r) for r in train]
    tok = load_tiny_tokenizer(make_tiny_tokenizer(tmp_path / "tok", corpus, word_tokens=TASKS["chain"].word_tokens))
    lengths = [len(tok(chain_completion(r), add_special_tokens=False)["input_ids"]) for r in train]
    steps = [int(PROBLEM.fullmatch(r["problem"]).group(4)) for r in train]
    assert lengths == [11 * n + 6 for n in steps]  # 11 tokens a step (the last one has no space), 7 for the answer
    assert 160 <= min(lengths) and max(lengths) <= 248
    ids = tok(chain_completion(train[0]), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[-7:]) == ["\n", "</think>", "\n", "\\boxed{", *train[0]["answer"], "}"]
    assert tok.decode(ids) == chain_completion(train[0])  # word tokens keep the round trip exact


def test_chain_error_names_the_first_error_and_where():
    row = chain_row(5, 7, 1, 4)  # 04:5+7+1=3 03:7+3+1=1 02:3+1+1=5 01:1+5+1=7 \boxed{57}
    right = chain_completion(row)
    assert chain_error(row["problem"], right) == ("right", 0)
    assert grade_completion(right, row["answer"])
    cases = {
        ("label", 3): right.replace("03:", "02:"),
        ("copy", 3): right.replace("03:7+3", "03:7+4"),
        ("constant", 2): right.replace("02:3+1+1", "02:3+1+0"),
        ("sum", 1): right.replace("01:1+5+1=7", "01:1+5+1=8"),
        ("steps", 1): right.replace(" 01:1+5+1=7", ""),
        ("steps", 0): right.replace("01:1+5+1=7", "01:1+5+1=7 00:5+7+1=3"),
        ("no_box", 0): right.replace("\\boxed{57}", "57"),
        ("box_first", 0): right.replace("\\boxed{57}", "\\boxed{17}"),
        ("box_second", 0): right.replace("\\boxed{57}", "\\boxed{51}"),
        ("box_other", 0): right.replace("\\boxed{57}", "\\boxed{75}"),
    }
    for want, completion in cases.items():
        assert completion != right, want
        assert chain_error(row["problem"], completion) == want, (want, completion)
    with pytest.raises(ValueError, match="not a chain problem"):
        chain_error("What is 2 + 2?", right)


def test_held_out_evaluation_reports_the_chain_error_kinds(monkeypatch):
    """The run's evaluation adds eval/error/<kind> for a built-in task: fractions of all completions, the
    'right' fraction equal to the accuracy."""
    from types import SimpleNamespace

    import numpy as np

    import poer_jax.eval.evaluator as evaluator
    from poer_jax.system.config import default_config
    from poer_jax.tasks import error_fractions
    from poer_jax.train.held_out import evaluate_held_out

    rows = [chain_row(5, 7, 1, 4), chain_row(2, 0, 0, 3)]
    right = [chain_completion(r) for r in rows]
    completions = [[right[0], right[0].replace("\\boxed{57}", "\\boxed{51}")],
                   [right[1].replace("03:2+0", "03:2+1"), right[1]]]
    correct = np.array([[True, False], [False, True]])

    def fake_evaluate(sampler, tokenizer, prompt_ids, solutions, answers, **kw):
        assert answers == [r["answer"] for r in rows] and kw["k"] == 2
        return evaluator.EvalResult(correct=correct, completions=completions, lengths=np.full((2, 2), 9),
                                    seconds=1.0)

    monkeypatch.setattr(evaluator, "evaluate", fake_evaluate)
    cfg = default_config()
    cfg.toy.enabled, cfg.toy.task, cfg.eval.num_samples = True, "chain", 2
    prompts = SimpleNamespace(ids=[[1], [2]], rows=lambda idx: [rows[i] for i in idx])
    trainer = SimpleNamespace(cfg=cfg, eval_prompts=_Sized(prompts, 2), sampler=None, tokenizer=None,
                              eval_sampling=None, grader=None,
                              rows=SimpleNamespace(count=1, index=0, gather=lambda x: x, max=lambda x: x))
    metrics, got = evaluate_held_out(trainer)
    np.testing.assert_array_equal(got, correct)
    assert metrics["eval/accuracy"] == 0.5 == metrics["eval/error/right"]
    assert metrics["eval/error/box_second"] == 0.25 and metrics["eval/error/copy"] == 0.25
    assert sum(v for k, v in metrics.items() if k.startswith("eval/error/")) == 1.0
    assert error_fractions("arithmetic", [rows[0]["problem"]], [[right[0]]]) == {}


class _Sized:
    """Held-out prompts stand-in: ids, rows(idx) and len()."""

    def __init__(self, inner, n):
        self.ids, self.rows, self._n = inner.ids, inner.rows, n

    def __len__(self):
        return self._n
