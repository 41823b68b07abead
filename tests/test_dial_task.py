"""The dial task (the demo's long-answer task) and the tiny tokenizer's word tokens."""

from __future__ import annotations

import re

import pytest

from poer_jax.eval.answers import grade_completion
from poer_jax.tasks import TASKS, make_task_splits, task_completion
from poer_jax.tasks.dial import LABELS, DialTaskConfig, dial_completion, generate_dial_rows, make_dial_splits
from poer_jax.tasks.tiny_tokenizer import load_tiny_tokenizer, make_tiny_tokenizer
from poer_jax.train.rewards import format_reward

STEP = re.compile(r"([a-zA-Z])(\d):(\d)")


def _turns(problem: str) -> tuple[int, list[tuple[str, int]]]:
    start, turns = re.fullmatch(r"Dial at (\d)\. Turn (.*)\.", problem).groups()
    return int(start), [(t[0], int(t[1:])) for t in turns.split(" ")]


@pytest.fixture(scope="module")
def splits():
    return make_dial_splits(300, 60, seed=3, cfg=DialTaskConfig(min_turns=24, max_turns=32))


def test_rows_are_deterministic_distinct_and_worked_step_by_step(splits):
    train, test = splits
    assert (train, test) == make_dial_splits(300, 60, seed=3, cfg=DialTaskConfig(min_turns=24, max_turns=32))
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for row in train + test:
        start, turns = _turns(row["problem"])
        assert 24 <= len(turns) <= 32 and [t[0] for t in turns] == list(LABELS[: len(turns)])
        steps = STEP.findall(row["solution"])
        assert [(lab, int(v)) for lab, v, _ in steps] == turns  # each step looks its turn up by label
        pos = start
        for (_, v, p) in steps:
            pos = (pos + int(v)) % 10
            assert int(p) == pos
        assert row["answer"] == str(pos) and row["solution"].endswith(f"\\boxed{{{pos}}}")


def test_knobs_and_bad_values():
    rows = make_task_splits("dial", 50, 0, seed=0, max_value=2, min_operands=3, max_operands=4)[0]
    for row in rows:
        _, turns = _turns(row["problem"])
        assert 3 <= len(turns) <= 4 and all(1 <= v <= 2 for _, v in turns)
    for bad in (dict(min_turns=1), dict(min_turns=5, max_turns=4), dict(max_turns=53), dict(max_turn=10)):
        with pytest.raises(ValueError, match="dial task"):
            DialTaskConfig(**bad)
    with pytest.raises(ValueError, match="unknown built-in task"):
        make_task_splits("nope", 1, 1, seed=0, max_value=9, min_operands=2, max_operands=3)


def test_completion_is_graded_right_and_is_150_to_250_tokens_at_the_demo_setting(splits, tmp_path):
    train, _ = splits
    for row in train[:5]:  # math-verify is ~10 ms a pair
        c = task_completion("dial", row)
        assert c == dial_completion(row) and c.endswith(f"\n</think>\n\\boxed{{{row['answer']}}}")
        assert grade_completion(c, row["solution"], row["answer"]).correct is True
        assert format_reward([c]) == [1.0]
    rows = generate_dial_rows(50, seed=0, cfg=DialTaskConfig(min_turns=30, max_turns=40))
    corpus = [r["problem"] for r in rows] + [dial_completion(r) for r in rows]
    tok = load_tiny_tokenizer(make_tiny_tokenizer(tmp_path / "tok", corpus, word_tokens=TASKS["dial"].word_tokens))
    lengths = [len(tok(dial_completion(r), add_special_tokens=False)["input_ids"]) for r in rows]
    assert 150 <= min(lengths) and max(lengths) <= 210
    ids = tok(dial_completion(rows[0]), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[-6:]) == ["\n", "</think>", "\n", "\\boxed{", rows[0]["answer"], "}"]
    assert tok.decode(ids) == dial_completion(rows[0])  # word tokens keep the round trip exact
    with pytest.raises(ValueError, match="word_tokens"):
        make_tiny_tokenizer(tmp_path / "bad", corpus, word_tokens=("x",))
