"""Data loading and prompt building (poer_jax.system.data), and the resumable sharded iterator
(poer_jax.train.iterator)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from poer_jax.system.data import (
    PLAIN_TEMPLATE,
    ColumnMap,
    DataError,
    PromptConfig,
    build_prompt_text,
    load_dataset_file,
    tokenize_prompts,
)
from poer_jax.tasks.tiny_tokenizer import load_tiny_tokenizer, make_tiny_tokenizer
from poer_jax.train.iterator import EpochIterator

ROWS = [
    {"problem": "Compute 1 + 2.", "solution": "1 + 2 = 3. \\boxed{3}", "answer": "3", "level": "1"},
    {"problem": "Compute 4 + 5.", "solution": "4 + 5 = 9. \\boxed{9}", "answer": "9", "level": "2"},
    {"problem": "Compute 7 - 2.", "solution": "7 - 2 = 5. \\boxed{5}", "answer": "5", "level": "1"},
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tok")
    return load_tiny_tokenizer(make_tiny_tokenizer(out, [r["problem"] for r in ROWS]))


# ---------------------------------------------------------------------------------------------- loading


def test_jsonl_happy_path_keeps_extra_columns(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1])])
    ds = load_dataset_file(p)
    assert len(ds) == 2
    assert ds.rows[1] == ROWS[1]
    assert ds.locations == [f"{p}:1", f"{p}:3"]  # blank line skipped, lines still counted
    assert ds.columns([1, 0]) == {k: [ROWS[1][k], ROWS[0][k]] for k in ROWS[0]}
    ragged = _write_jsonl(
        tmp_path / "r.jsonl", [json.dumps(ROWS[0]), json.dumps({"problem": "p", "answer": 1, "id": 5})]
    )
    assert load_dataset_file(ragged).columns([1, 0]) == {
        "problem": ["p", ROWS[0]["problem"]],
        "solution": [None, ROWS[0]["solution"]],
        "answer": ["1", "3"],
        "id": [5, None],
        "level": [None, "1"],
    }


def test_custom_column_names_and_integer_answers(tmp_path: Path) -> None:
    # AIME style: problem + integer answer, no solution, other column names.
    p = _write_jsonl(tmp_path / "aime.jsonl", [json.dumps({"question": "Find x.", "gold": 42, "id": 7})])
    ds = load_dataset_file(p, columns=ColumnMap(problem="question", solution=None, answer="gold"))
    assert ds.rows == [{"id": 7, "problem": "Find x.", "solution": None, "answer": "42"}]


def test_json_array_and_limit(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS), encoding="utf-8")
    ds = load_dataset_file(p, limit=2)
    assert [r["problem"] for r in ds.rows] == [r["problem"] for r in ROWS[:2]]
    assert ds.locations[1] == f"{p} row 1"


def test_parquet_happy_path(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p)
    ds = load_dataset_file(p)
    assert ds.rows == ROWS
    assert ds.locations[2] == f"{p} row 2"


def test_saved_hf_dataset_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")  # optional at run time; the test extra installs it, so CI runs this
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "hf"))
    ds = load_dataset_file(tmp_path / "hf")
    assert ds.rows == ROWS
    with pytest.raises(DataError, match=r"splits found: \['train'\]"):
        load_dataset_file(tmp_path / "hf", split="test")


@pytest.mark.parametrize(
    "lines, pattern",
    [
        ([json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"problem": "x", '], r"d\.jsonl:3: malformed JSON"),
        ([json.dumps(ROWS[0]), "[1, 2]"], r"d\.jsonl:2: expected a JSON object"),
        (
            [json.dumps({"question": "x", "answer": "1"})],
            r"d\.jsonl:1: missing column 'problem' \(config key 'data.problem_key'\); columns found: "
            r"\['question', 'answer'\]",
        ),
        (
            [json.dumps({"problem": "x", "level": 1})],
            r"d\.jsonl:1: no gold: columns 'solution' \(config key 'data.solution_key'\), 'answer' \(config key "
            r"'data.answer_key'\) are missing or empty; columns found",
        ),
        (
            [json.dumps({"problem": "", "answer": "1"})],
            r"d\.jsonl:1: column 'problem' \(config key 'data.problem_key'\) must be a non-empty",
        ),
        (["", "  "], r"d\.jsonl: the dataset has no rows"),
    ],
)
def test_bad_jsonl_errors_name_file_line_and_column(tmp_path: Path, lines: list[str], pattern: str) -> None:
    p = _write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=pattern):
        load_dataset_file(p)


def test_parquet_missing_column_and_unreadable_paths(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prob": "x", "answer": "1"}]), p)
    with pytest.raises(
        DataError,
        match=r"d\.parquet row 0: missing column 'problem' \(config key 'data.problem_key'\); columns found: \['prob'",
    ):
        load_dataset_file(p)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read as Parquet"):
        load_dataset_file(bad)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_dataset_file(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("problem\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format"):
        load_dataset_file(tmp_path / "d.csv")


# ---------------------------------------------------------------------------------------------- prompts


def test_chat_template_prompt_and_ids(tmp_path: Path, tokenizer) -> None:
    p = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    ds = load_dataset_file(p)
    cfg = PromptConfig(system_prompt="Be brief.", max_prompt_len=200)
    text = build_prompt_text(tokenizer, ROWS[0]["problem"], cfg)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1 + 2.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    tp = tokenize_prompts(tokenizer, ds, cfg)
    assert len(tp) == 3 and tp.num_skipped == 0
    assert tp.texts[0] == text
    assert tokenizer.decode(tp.ids[0].tolist()) == text  # no special token added on top of the template
    assert tp.ids[0].dtype == np.int32 and tp.lengths[0] == len(tp.ids[0])
    assert tp.rows([2])[0]["answer"] == "5"


def test_plain_template_without_chat_template(tmp_path: Path, tokenizer) -> None:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    cfg = PromptConfig(system_prompt="SYS", max_prompt_len=200)
    assert build_prompt_text(tokenizer, "Compute 1 + 2.", cfg) == PLAIN_TEMPLATE.format(
        system="SYS", problem="Compute 1 + 2."
    )
    assert build_prompt_text(tokenizer, "Q", PromptConfig(system_prompt=None)) == "Problem: Q\nAnswer:"
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt_text(tokenizer, "Q", PromptConfig(chat_template="always"))


def test_too_long_prompt_error_names_row_and_skip_warns(tmp_path: Path, tokenizer) -> None:
    rows = [ROWS[0], {"problem": "Compute " + " + ".join(["1"] * 40) + ".", "answer": "40"}, ROWS[1]]
    p = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    ds = load_dataset_file(p)
    cfg = PromptConfig(system_prompt=None, max_prompt_len=80)
    with pytest.raises(DataError, match=rf"{p.name}:2: prompt is \d+ tokens, longer than max_prompt_len=80"):
        tokenize_prompts(tokenizer, ds, cfg)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 rows .* \(first: .*d\.jsonl:2\)"):
        tp = tokenize_prompts(
            tokenizer, ds, PromptConfig(system_prompt=None, max_prompt_len=80, on_too_long="skip")
        )
    assert tp.num_skipped == 1 and tp.row_index.tolist() == [0, 2]
    assert tp.columns([1])["problem"] == [ROWS[1]["problem"]]


# ---------------------------------------------------------------------------------------------- iterator


def _take(it: EpochIterator, n: int) -> list[list[int]]:
    return [next(it).indices.tolist() for _ in range(n)]


def test_iterator_is_deterministic_and_each_epoch_is_a_permutation() -> None:
    a = _take(EpochIterator(23, 5, seed=7), 12)
    assert a == _take(EpochIterator(23, 5, seed=7), 12)
    assert a != _take(EpochIterator(23, 5, seed=8), 12)
    for e in range(3):  # 4 steps per epoch, 3 leftovers dropped
        epoch = sum(a[4 * e : 4 * e + 4], [])
        assert len(set(epoch)) == 20 and all(0 <= i < 23 for i in epoch)
    assert _take(EpochIterator(10, 5, seed=0, shuffle=False), 3) == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [0, 1, 2, 3, 4],
    ]


def test_sharding_partitions_each_global_batch() -> None:
    whole = _take(EpochIterator(50, 12, seed=3), 9)
    shards = [_take(EpochIterator(50, 12, seed=3, process_index=p, process_count=4), 9) for p in range(4)]
    for step in range(9):
        assert sum((shards[p][step] for p in range(4)), []) == whole[step]
    with pytest.raises(ValueError, match="not divisible"):
        EpochIterator(50, 10, seed=0, process_index=0, process_count=4)


def test_state_roundtrip_resumes_exactly_even_with_other_process_count() -> None:
    ref = EpochIterator(17, 4, seed=11)
    expected = [(b.indices.tolist(), b.epoch, b.step) for b in (next(ref) for _ in range(15))]
    it = EpochIterator(17, 4, seed=11)
    for _ in range(6):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["epoch"] == 1 and state["offset"] == 8
    resumed = EpochIterator(17, 4, seed=11)
    resumed.set_state(state)
    got = [(b.indices.tolist(), b.epoch, b.step) for b in (next(resumed) for _ in range(9))]
    assert got == expected[6:]
    halves = [EpochIterator(17, 4, seed=11, process_index=p, process_count=2) for p in range(2)]
    for h in halves:
        h.set_state(state)
    assert next(halves[0]).indices.tolist() + next(halves[1]).indices.tolist() == expected[6][0]
    with pytest.raises(ValueError, match="seed=11, this iterator has 12"):
        EpochIterator(17, 4, seed=12).set_state(state)


def test_finite_epochs_stop() -> None:
    it = EpochIterator(9, 3, seed=0, num_epochs=2)
    assert len(it) == 6
    assert len(list(it)) == 6


@pytest.mark.parametrize("answer, kind", [(["1"], "list"), ({"v": 1}, "dict"), (True, "bool")])
def test_answers_that_are_not_strings_or_numbers_are_refused(tmp_path: Path, answer, kind) -> None:
    """They would be graded as their repr ("['1']"), which no completion matches: every reward 0, silently."""
    p = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), json.dumps({"problem": "x", "answer": answer})])
    cmap = ColumnMap(answer="answer", options=("--problem-key", "--solution-key", "--answer-key"))
    with pytest.raises(DataError, match=rf"d\.jsonl:2: column 'answer' \(--answer-key\) must be a string or a number, "
                                        rf"got {kind}"):
        load_dataset_file(p, cmap)
    assert load_dataset_file(_write_jsonl(tmp_path / "n.jsonl", ['{"problem": "x", "answer": 2.5}'])).rows[0][
        "answer"] == "2.5"
