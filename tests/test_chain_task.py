"""The chain task (the demo's long-answer task) and the tiny tokenizer's word tokens."""

from __future__ import annotations

import re

import pytest

from poer_jax.eval.answers import grade_completion
from poer_jax.tasks import TASKS, make_task_splits, task_capacity, task_completion
from poer_jax.tasks.chain import (
    ChainTaskConfig,
    chain_completion,
    chain_row,
    generate_chain_rows,
    make_chain_splits,
    num_chain_problems,
)
from poer_jax.tasks.tiny_tokenizer import load_tiny_tokenizer, make_tiny_tokenizer
from poer_jax.train.rewards import format_reward

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
