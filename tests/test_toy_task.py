"""The synthetic arithmetic task and the tiny local tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from poer_jax.rewards.answers import grade_completion
from poer_jax.rewards.functions import format_reward
from poer_jax.system.data import load_dataset_file
from poer_jax.tasks.tiny_tokenizer import SPECIAL_TOKENS, load_tiny_tokenizer, make_tiny_tokenizer
from poer_jax.tasks.toy import ToyTaskConfig, generate_toy_rows, make_toy_splits, toy_completion, write_jsonl

STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")


@pytest.fixture(scope="module")
def splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return make_toy_splits(400, 100, seed=5)


def _check_arithmetic(row: dict[str, str]) -> None:
    steps = STEP.findall(row["solution"])
    assert steps, row
    for a, op, b, r in steps:
        a, b, r = int(a), int(b), int(r)
        assert r == (a + b if op == "+" else a - b if op == "-" else a * b), row
    for (_, _, _, r), (a, _, _, _) in zip(steps, steps[1:], strict=False):
        assert r == a, row  # each step continues from the previous result
    assert steps[-1][3] == row["answer"], row
    if row["problem"].startswith("Compute "):
        expr = row["problem"][len("Compute ") : -1]
        assert re.fullmatch(r"[\d +*-]+", expr)
        assert eval(expr) == int(row["answer"]), row  # noqa: S307 - digits and + - * only (checked above)


def test_toy_rows_are_deterministic_and_distinct(splits) -> None:
    train, test = splits
    assert (train, test) == make_toy_splits(400, 100, seed=5)
    assert train != make_toy_splits(400, 100, seed=6)[0]
    problems = [r["problem"] for r in train + test]
    assert len(set(problems)) == len(problems)  # no duplicates, so no train / test overlap
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert any(r["problem"].startswith("Compute") for r in train)
    assert any("How many" in r["problem"] for r in train)


def test_toy_solutions_are_short_correct_and_verified_by_math_verify(splits) -> None:
    train, test = splits
    for row in train + test:
        assert set(row) == {"problem", "solution", "answer"}
        assert 15 <= len(row["solution"]) <= 60, row
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        _check_arithmetic(row)
    for row in (train + test)[::10]:  # math-verify is ~10 ms a pair
        assert grade_completion(row["solution"], None, row["answer"]).correct is True
        completion = toy_completion(row)
        assert grade_completion(completion, row["solution"], row["answer"]).correct is True
        assert format_reward([completion]) == [1.0]


def test_difficulty_knobs() -> None:
    cfg = ToyTaskConfig(
        min_operands=4,
        max_operands=4,
        min_value=10,
        max_value=20,
        operations=("+", "-", "*"),
        word_problem_fraction=0.0,
    )
    rows = generate_toy_rows(200, seed=0, cfg=cfg)
    for row in rows:
        operands = [int(x) for x in re.findall(r"\d+", row["problem"])]
        assert len(operands) == 4
        assert "*" not in row["problem"][len("Compute ") + 3 :] or row["problem"].count("*") == 1
        _check_arithmetic(row)
        assert int(row["answer"]) >= 0
    assert any("*" in r["problem"] for r in rows)
    with pytest.raises(ValueError, match="could only generate"):
        generate_toy_rows(
            50, seed=0, cfg=ToyTaskConfig(min_value=1, max_value=2, max_operands=2, word_problem_fraction=0.0)
        )
    with pytest.raises(ValueError, match="operations"):
        ToyTaskConfig(operations=("/",))


def test_jsonl_round_trip_through_the_loader(tmp_path: Path, splits) -> None:
    train, _ = splits
    p = write_jsonl(train[:20], tmp_path / "toy" / "train.jsonl")
    assert json.loads(p.read_text().splitlines()[0]) == train[0]
    assert load_dataset_file(p).rows == train[:20]


# ---------------------------------------------------------------------------------------------- tokenizer


def _corpus(rows: list[dict[str, str]]) -> list[str]:
    return [r["problem"] for r in rows] + [toy_completion(r) for r in rows]


def test_tiny_tokenizer_round_trips_the_corpus_with_a_chat_template(tmp_path: Path, splits) -> None:
    from transformers import AutoTokenizer

    train, test = splits
    path = make_tiny_tokenizer(tmp_path / "tok", _corpus(train))
    tok = load_tiny_tokenizer(path)
    assert len(tok) < 128
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in _corpus(train + test):  # held-out text too: every character is in the vocabulary
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": test[0]["problem"]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{test[0]['problem']}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    full = prompt + toy_completion(test[0]) + tok.eos_token
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full and ids[-1] == tok.eos_token_id and ids[0] == 1
    auto = AutoTokenizer.from_pretrained(str(path))
    assert auto(full, add_special_tokens=False)["input_ids"] == ids
    # With a qwen2 model config in the same directory, load_tiny_tokenizer still gives the same tokenizer.
    (path / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    assert load_tiny_tokenizer(path)(full, add_special_tokens=False)["input_ids"] == ids


def test_tiny_bpe_tokenizer_round_trips(tmp_path: Path, splits) -> None:
    train, test = splits
    tok = load_tiny_tokenizer(make_tiny_tokenizer(tmp_path / "bpe", _corpus(train), vocab_size=160))
    assert len(tok) == 160
    text = toy_completion(test[0])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text)
    with pytest.raises(ValueError, match="below the"):
        make_tiny_tokenizer(tmp_path / "small", _corpus(train), vocab_size=50)
