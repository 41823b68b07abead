"""Training / evaluation data: loading, prompt building and tokenisation.

Rows are loaded from JSONL (``.jsonl``, ``.json``: one object per line, or a JSON array), Parquet
(``.parquet``, pyarrow) or a directory saved by ``datasets.save_to_disk`` (imported lazily, only when
such a directory is given). Columns follow open-rs (``problem``, ``solution``, ``answer``); the names
are configurable (``ColumnMap``) and renamed to these canonical names, other columns are kept and passed
to user reward functions. A row needs a problem and at least one of solution / answer (MATH-500, AIME
and AMC files have no solution); the gold is graded from the solution first (``poer_jax.rewards.answers``).

Errors (``DataError``, a ValueError) name the file and the line or row: malformed JSON (``file:line``),
a missing column (with the columns found), an empty dataset, an unreadable path.

Prompts: the system prompt (default open-rs's) and the problem go through the tokenizer's chat template
(``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``) and are encoded without
adding special tokens (the template already has them); a tokenizer without a chat template gets the plain
template ``"{system}\\n\\nProblem: {problem}\\nAnswer:"``, encoded with the tokenizer's special tokens.

The resumable sharded iterator over the questions is the run's (``poer_jax.train.iterator``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poer_jax.jsonl import parse_json_object

__all__ = [
    "OPEN_RS_SYSTEM_PROMPT",
    "PLAIN_TEMPLATE",
    "ColumnMap",
    "DataError",
    "MathDataset",
    "PromptConfig",
    "TokenizedPrompts",
    "build_prompt_text",
    "count_jsonl_rows",
    "load_dataset_file",
    "tokenize_prompts",
]

# open-rs recipes/grpo.yaml system prompt (open-rs writes \\boxed{{}} in YAML; the model sees \boxed{}).
OPEN_RS_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer, and put your final answer within \\boxed{} . The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. Note that respond by English, NOT use other languages."
)
PLAIN_TEMPLATE = "{system}\n\nProblem: {problem}\nAnswer:"
CANONICAL = ("problem", "solution", "answer")


class DataError(ValueError):
    """Bad input data; the message names the file and the line, row or column."""


@dataclass(frozen=True)
class ColumnMap:
    """Names of the problem / solution / answer columns in the file (None: the file has no such column),
    and the names of the options that set them, for error messages (the training config's keys, or the
    evaluator's flags)."""

    problem: str = "problem"
    solution: str | None = "solution"
    answer: str | None = "answer"
    options: tuple[str, str, str] = ("data.problem_key", "data.solution_key", "data.answer_key")

    def option(self, column: str) -> str:
        """``"config key 'data.problem_key'"``-style name of the option that sets ``column``."""
        name = dict(zip(CANONICAL, self.options, strict=True))[column]
        return f"config key {name!r}" if not name.startswith("-") else name


@dataclass
class MathDataset:
    """Rows with canonical keys ``problem``, ``solution``, ``answer`` (None when absent) plus the file's
    other columns, and each row's location (``file:line`` or ``file row i``) for error messages."""

    rows: list[dict[str, Any]]
    locations: list[str]
    path: str

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: Sequence[int]) -> dict[str, list[Any]]:
        """Column-major view of some rows: what reward functions receive as dataset columns."""
        keys = list(CANONICAL)
        for i in indices:  # JSONL rows may differ in their extra columns: take the union, in order
            keys += [k for k in self.rows[int(i)] if k not in keys]
        return {k: [self.rows[int(i)].get(k) for i in indices] for k in keys}


def count_jsonl_rows(path: str | Path | None, limit: int | None = None) -> int | None:
    """The rows of a local ``.jsonl`` file (its non-blank lines; at most ``limit``) without parsing them, as a
    plan sizes what a run would load; None for another format or a file that is not here."""
    if not path or not str(path).endswith(".jsonl") or not Path(path).is_file():
        return None
    with open(path, "rb") as f:
        rows = sum(1 for line in f if line.strip())
    return min(rows, limit) if limit else rows


def load_dataset_file(
    path: str | Path,
    columns: ColumnMap | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> MathDataset:
    """Load rows from a JSONL / JSON / Parquet file or a saved HF dataset directory."""
    columns = columns or ColumnMap()
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        records, locations = _read_hf_dir(p, split)
    elif p.suffix in (".jsonl", ".json"):
        records, locations = _read_json(p)
    elif p.suffix == ".parquet":
        records, locations = _read_parquet(p)
    else:
        raise DataError(
            f"{p}: unknown data format {p.suffix!r} (expected .jsonl, .json, .parquet or a "
            "saved datasets directory)"
        )
    if limit is not None:
        records, locations = records[:limit], locations[:limit]
    if not records:
        raise DataError(f"{p}: the dataset has no rows")
    rows = [_canonical_row(r, loc, columns) for r, loc in zip(records, locations, strict=True)]
    return MathDataset(rows=rows, locations=locations, path=str(p))


def _read_json(p: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read: {e}") from e
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise DataError(f"{p} row {i}: expected a JSON object, got {type(r).__name__}")
        return records, [f"{p} row {i}" for i in range(len(records))]
    records, locations = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(parse_json_object(line, f"{p}:{lineno}", DataError))
        locations.append(f"{p}:{lineno}")
    return records, locations


def _read_parquet(p: Path) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:
        raise DataError(f"{p}: cannot read as Parquet: {e}") from e
    records = table.to_pylist()
    return records, [f"{p} row {i}" for i in range(len(records))]


def _read_hf_dir(p: Path, split: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{p}: a saved HF dataset directory needs the 'datasets' package "
            "(pip install 'poer_jax[datasets]')"
        ) from e
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{p}: cannot load as a saved HF dataset: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        chosen = (
            split
            if split is not None
            else ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        )
        if chosen is None or chosen not in ds:
            raise DataError(f"{p}: choose a split with split=...; splits found: {names}")
        ds, where = ds[chosen], f"{p}[{chosen}]"
    else:
        where = str(p)
    records = ds.to_list()
    return records, [f"{where} row {i}" for i in range(len(records))]


def _canonical_row(record: Mapping[str, Any], loc: str, cmap: ColumnMap) -> dict[str, Any]:
    found = list(record)
    if cmap.problem not in record:
        raise DataError(f"{loc}: missing column {cmap.problem!r} ({cmap.option('problem')}); columns found: {found}")
    problem = record[cmap.problem]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{loc}: column {cmap.problem!r} ({cmap.option('problem')}) must be a non-empty string, "
                        f"got {problem!r:.80}")
    solution = record.get(cmap.solution) if cmap.solution else None
    answer = record.get(cmap.answer) if cmap.answer else None
    if solution is not None and not isinstance(solution, str):
        raise DataError(f"{loc}: column {cmap.solution!r} ({cmap.option('solution')}) must be a string, got "
                        f"{type(solution).__name__} {solution!r:.80}")
    if isinstance(answer, bool) or (answer is not None and not isinstance(answer, str | int | float)):
        # a list, dict or bool would be graded as its repr ("['1']"), which no completion ever matches
        raise DataError(f"{loc}: column {cmap.answer!r} ({cmap.option('answer')}) must be a string or a number, "
                        f"got {type(answer).__name__} {answer!r:.80}")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)  # AIME-style integer answers
    if not (isinstance(solution, str) and solution.strip()) and not (answer is not None and answer.strip()):
        wanted = [f"{c!r} ({cmap.option(k)})" for k, c in (("solution", cmap.solution), ("answer", cmap.answer)) if c]
        raise DataError(f"{loc}: no gold: columns {', '.join(wanted)} are missing or empty; columns found: {found}")
    renamed = {c for c in (cmap.problem, cmap.solution, cmap.answer) if c}
    row = {k: v for k, v in record.items() if k not in renamed}
    clash = [k for k in CANONICAL if k in row]
    if clash:
        raise DataError(f"{loc}: column(s) {clash} clash with the canonical names mapped from {cmap}")
    row.update(problem=problem, solution=solution, answer=answer)
    return row


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are built and length-checked.

    chat_template: "auto" (the tokenizer's chat template if it has one, else the plain template),
      "always" (error without one) or "never" (always the plain template).
    on_too_long: "error" (DataError naming the row) or "skip" (drop the row, warn with the count).
    """

    system_prompt: str | None = OPEN_RS_SYSTEM_PROMPT
    chat_template: str = "auto"
    plain_template: str = PLAIN_TEMPLATE
    max_prompt_len: int = 512
    on_too_long: str = "error"

    def __post_init__(self) -> None:
        if self.chat_template not in ("auto", "always", "never"):
            raise ValueError(f"chat_template must be 'auto', 'always' or 'never', got {self.chat_template!r}")
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long must be 'error' or 'skip', got {self.on_too_long!r}")
        if self.max_prompt_len <= 0:
            raise ValueError(f"max_prompt_len must be positive, got {self.max_prompt_len}")


def _uses_chat_template(tokenizer: Any, cfg: PromptConfig) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "always" and not has:
        raise ValueError("PromptConfig.chat_template='always' but the tokenizer has no chat template")
    return has and cfg.chat_template != "never"


def build_prompt_text(tokenizer: Any, problem: str, cfg: PromptConfig | None = None) -> str:
    """The prompt text for one problem (chat template with generation prompt, or the plain template)."""
    cfg = cfg or PromptConfig()
    if _uses_chat_template(tokenizer, cfg):
        messages = []
        if cfg.system_prompt:  # "" = no system message
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": problem})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return cfg.plain_template.format(system=cfg.system_prompt or "", problem=problem).lstrip()


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if callable(tokenizer) and hasattr(tokenizer, "apply_chat_template"):  # a transformers tokenizer
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    out = []
    for t in texts:  # e.g. a bare tokenizers.Tokenizer
        enc = tokenizer.encode(t, add_special_tokens=add_special_tokens)
        out.append(list(getattr(enc, "ids", enc)))
    return out


@dataclass
class TokenizedPrompts:
    """The dataset's rows that fit, with their prompt text and ids; ``row_index`` maps back to the source
    dataset, ``num_skipped`` counts rows dropped for length (``on_too_long="skip"``)."""

    dataset: MathDataset
    row_index: np.ndarray
    texts: list[str]
    ids: list[np.ndarray]
    num_skipped: int = 0
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.asarray([len(x) for x in self.ids], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self.dataset.rows[int(self.row_index[int(i)])] for i in indices]

    def columns(self, indices: Sequence[int]) -> dict[str, list[Any]]:
        return self.dataset.columns([int(self.row_index[int(i)]) for i in indices])


def tokenize_prompts(
    tokenizer: Any, dataset: MathDataset, cfg: PromptConfig | None = None
) -> TokenizedPrompts:
    """Build and tokenise every row's prompt; enforce ``max_prompt_len`` (error naming the row, or skip)."""
    cfg = cfg or PromptConfig()
    chat = _uses_chat_template(tokenizer, cfg)
    texts = [build_prompt_text(tokenizer, row["problem"], cfg) for row in dataset.rows]
    ids = _encode(tokenizer, texts, add_special_tokens=not chat)
    keep, too_long = [], []
    for i, x in enumerate(ids):
        if len(x) > cfg.max_prompt_len:
            if cfg.on_too_long == "error":
                raise DataError(
                    f"{dataset.locations[i]}: prompt is {len(x)} tokens, longer than "
                    f"max_prompt_len={cfg.max_prompt_len} (set on_too_long='skip' to drop such rows)"
                )
            too_long.append(i)
        else:
            keep.append(i)
    if too_long:
        warnings.warn(
            f"{dataset.path}: skipped {len(too_long)} of {len(ids)} rows whose prompt is longer than "
            f"max_prompt_len={cfg.max_prompt_len} tokens (first: {dataset.locations[too_long[0]]})",
            stacklevel=2,
        )
    if not keep:
        raise DataError(f"{dataset.path}: no row has a prompt within max_prompt_len={cfg.max_prompt_len}")
    return TokenizedPrompts(
        dataset=dataset,
        row_index=np.asarray(keep, dtype=np.int64),
        texts=[texts[i] for i in keep],
        ids=[np.asarray(ids[i], dtype=np.int32) for i in keep],
        num_skipped=len(too_long),
    )
