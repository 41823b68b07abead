"""Cache pool initialisation C^(0) (paper Sec. 3.1, Eq. 1) from already-tokenised answers.

Eq. 1 samples a_k ~ pi_theta0(. | q_k) once per question. That sampling happens in the sampler; its token
arrays go through :func:`from_token_arrays`. Alternatives that the same pool accepts: reference solutions
tokenised by the caller (:func:`from_token_lists`) or answers produced offline by another model, as the
authors did with R1-Distill-1.5B (:func:`load_answers_file`, then :func:`from_token_lists`).

Entries without an answer stay unfilled; the rollout then starts from the question alone (plain GRPO).
All host-side work happens once here, the result is a single device transfer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Any

import jax
import numpy as np

from poer_jax.jsonl import parse_json_object
from poer_jax.poer.cache_pool import CachePool, insert

TokenList = Sequence[int] | np.ndarray


def _as_token_row(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0:
        return np.zeros((0,), np.int32)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: expected a flat list of integer token ids, got dtype {arr.dtype} "
                         f"shape {arr.shape}")
    if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{where}: token ids must be in [0, 2**31), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


def from_token_lists(token_lists: Sequence[TokenList | None] | Mapping[int, TokenList], max_len: int,
                     pad_id: int, eos_id: int | None = None, *, num_questions: int | None = None,
                     sharding: CachePool | None = None) -> CachePool:
    """C^(0) from one token-id list per dataset row (a sequence indexed by row, or a {row: ids} mapping).

    ``eos_id``: appended to every non-empty answer that does not already end with it and still has room,
    so a reference solution looks like a finished sampled response (truncation strips it again). Answers
    longer than max_len are cut to max_len (no EOS added, like a response that hit the length limit) and
    counted in one warning; empty or None entries stay unfilled (also reported). ``num_questions``
    defaults to len(token_lists) and is required for a mapping. ``sharding``: see ``pool_sharding``.
    """
    if isinstance(token_lists, Mapping):
        if num_questions is None:
            raise ValueError("cache init: num_questions is required when token_lists is a mapping")
        items = list(token_lists.items())
    else:
        num_questions = len(token_lists) if num_questions is None else num_questions
        items = list(enumerate(token_lists))
    if num_questions < 1 or max_len < 1:
        raise ValueError(f"cache init: num_questions and max_len must be >= 1, "
                         f"got {num_questions}, {max_len}")
    tokens = np.full((num_questions, max_len), pad_id, np.int32)
    lengths = np.zeros((num_questions,), np.int32)
    truncated: list[int] = []
    for row, value in items:
        if not 0 <= int(row) < num_questions:
            raise ValueError(f"cache init: row {row} outside [0, {num_questions})")
        if value is None:
            continue
        ids = _as_token_row(value, f"cache init row {row}")
        if ids.size and eos_id is not None and ids[-1] != eos_id and ids.size < max_len:
            ids = np.append(ids, np.int32(eos_id))
        if ids.size > max_len:
            truncated.append(int(row))
            ids = ids[:max_len]
        tokens[row, :ids.size] = ids
        lengths[row] = ids.size
    if truncated:
        warnings.warn(f"cache init: {len(truncated)} of {num_questions} answers were longer than max_len="
                      f"{max_len} tokens and were truncated (first rows: {truncated[:10]})", stacklevel=2)
    n_empty = int(np.sum(lengths == 0))
    if n_empty:
        warnings.warn(f"cache init: {n_empty} of {num_questions} rows have no answer and stay unfilled "
                      "(their rollouts start from the question alone)", stacklevel=2)
    filled = lengths > 0
    host = CachePool(tokens=tokens, lengths=lengths,
                     last_reward=np.full((num_questions,), np.nan, np.float32), filled=filled,
                     shortest_len=lengths.copy(), pad_id=int(pad_id))
    return jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)


def from_token_arrays(pool: CachePool, indices: jax.Array, tokens: jax.Array, lengths: jax.Array,
                      rewards: jax.Array | None = None) -> CachePool:
    """Fill rows from sampler output (Eq. 1): tokens [K, T] right-padded, lengths [K], optional rewards.

    For the sampling-based init: generate one answer per question with pi_theta0 and pass the arrays
    here batch by batch, starting from ``cache_pool.create``. Jittable; same semantics as ``insert``.
    """
    return insert(pool, indices, tokens, lengths, rewards)


def _row_for_problem(problems: Sequence[str] | None) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for row, text in enumerate(problems or ()):
        table.setdefault(text.strip(), []).append(row)
    return table


def load_answers_file(path: str | PathLike[str], tokenize: Callable[[str], Sequence[int]], *,
                      num_questions: int, problems: Sequence[str] | None = None) -> dict[int, list[int]]:
    """Read a JSONL answers file into {dataset row: token ids}, for :func:`from_token_lists`.

    Each non-blank line is an object with the row given by ``"index"`` (int) or ``"problem"`` (text,
    matched after strip() against ``problems``, the dataset's problem texts in row order; every row with
    that text receives the answer) and the answer in ``"answer_text"`` or ``"completion"``. When both
    ``index`` and ``problem`` are present and ``problems`` is given they must agree. ``tokenize`` maps
    answer text to token ids (the caller's tokenizer, without special tokens; EOS is added by
    from_token_lists). Any problem raises ValueError naming the file and line.
    """
    by_problem = _row_for_problem(problems)
    out: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            rec = parse_json_object(line, where)
            text = rec.get("answer_text", rec.get("completion"))
            if not isinstance(text, str):
                raise ValueError(f"{where}: needs a string field 'answer_text' or 'completion'")
            rows = _rows_of_record(rec, where, num_questions, problems, by_problem)
            try:
                raw = list(tokenize(text))
            except Exception as exc:
                raise ValueError(f"{where}: tokenize failed: {exc!r}") from exc
            ids = _as_token_row(raw, where).tolist()
            for row in rows:
                if row in out:
                    raise ValueError(f"{where}: a second answer for dataset row {row}")
                out[row] = ids
    return out


def _rows_of_record(rec: dict[str, Any], where: str, num_questions: int, problems: Sequence[str] | None,
                    by_problem: dict[str, list[int]]) -> list[int]:
    if "index" in rec:
        index = rec["index"]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_questions:
            raise ValueError(f"{where}: 'index' must be an integer in [0, {num_questions}), got {index!r}")
        if problems is not None and isinstance(rec.get("problem"), str) \
                and rec["problem"].strip() != problems[index].strip():
            raise ValueError(f"{where}: 'problem' does not match dataset row {index}")
        return [index]
    if "problem" in rec:
        if problems is None:
            raise ValueError(f"{where}: record has 'problem' but no 'index'; pass problems= to match it")
        problem = rec["problem"]
        if not isinstance(problem, str) or problem.strip() not in by_problem:
            raise ValueError(f"{where}: 'problem' not found in the dataset: {str(problem)[:80]!r}")
        return by_problem[problem.strip()]
    raise ValueError(f"{where}: needs an 'index' or a 'problem' field")

