"""avg@k and pass@k of a policy on a set of problems: k samples each, graded with math-verify.

Used by the training loop (held-out accuracy every N steps) and by ``python -m poer_jax.evaluate``.
The answer extraction and grading are the training reward's (``poer_jax.rewards.answers``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from poer_jax.eval.passk import avg_at_k, pass_at_k_from_matrix
from poer_jax.sampler import GroupSampler, SamplingParams
from poer_jax.sampler.pages import even_batches


class Grader(Protocol):
    """What grades completions: the run's reward pool (``poer_jax.train.reward_pool.RewardPool``) with an
    ``accuracy`` function; ``result["accuracy"]`` is [N] with 1.0 for a right answer, NaN when ungraded."""

    def compute(self, prompts: Sequence[Any], completions: Sequence[Any], *,
                columns: Mapping[str, Sequence[Any]] | None = None) -> Any: ...


def eval_key(seed: int) -> jax.Array:
    """The sampling key of an evaluation with ``seed``: the training loop's held-out evaluation and
    ``python -m poer_jax.evaluate --seed`` draw the same samples for the same seed."""
    return jax.random.fold_in(jax.random.key(seed), 1 << 30)


@dataclasses.dataclass
class EvalResult:
    correct: np.ndarray  # [num_problems, k] bool
    completions: list[list[str]]  # [num_problems][k]
    lengths: np.ndarray  # [num_problems, k] tokens
    seconds: float

    @property
    def k(self) -> int:
        return int(self.correct.shape[1])

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}accuracy": float(avg_at_k(self.correct)),
               f"{prefix}mean_length": float(self.lengths.mean()),
               f"{prefix}time_s": self.seconds}
        for k in sorted({1, self.k}):
            out[f"{prefix}pass@{k}"] = float(pass_at_k_from_matrix(self.correct, k))
        return out


def evaluate(
    sampler: GroupSampler,
    tokenizer: Any,
    prompt_ids: Sequence[np.ndarray],
    solutions: Sequence[str | None],
    answers: Sequence[str | None],
    *,
    k: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    key: jax.Array,
    grader: Grader,
    batch_size: int = 64,
    first_index: int = 0,
) -> EvalResult:
    """Sample k completions per prompt (batches of at most ``batch_size`` prompts) and grade them.

    Prompt j's samples come from fold_in(key, first_index + j) (see ``GroupSampler.generate``): the same
    whatever the batch size, and, with ``first_index`` its position in a larger set, however that set is
    split (over processes). The batches are of equal size (``even_batches``), so a set that does not divide by
    ``batch_size`` compiles no program of its own for a short last batch."""
    t0 = time.perf_counter()
    n = len(prompt_ids)
    texts: list[list[str]] = []
    lengths = np.zeros((n, k), np.int32)
    for start, stop in even_batches(n, batch_size):
        chunk = [list(map(int, p)) for p in prompt_ids[start: stop]]
        out = sampler.generate(chunk, k, max_new_tokens, key, sampling=sampling, group_offset=first_index + start)
        for g in range(len(chunk)):
            row = []
            for i in range(k):
                s = g * k + i
                row.append(tokenizer.decode(out.tokens[s, : out.lengths[s]].tolist(), skip_special_tokens=True))
                lengths[start + g, i] = out.lengths[s]
            texts.append(row)
    acc = grade(grader, texts, solutions, answers)
    return EvalResult(correct=acc, completions=texts, lengths=lengths, seconds=time.perf_counter() - t0)


def grade(grader: Grader, completions: Sequence[Sequence[str]], solutions: Sequence[str | None],
          answers: Sequence[str | None]) -> np.ndarray:
    """[problems, k] bool: completion j of problem i is right (math-verify, the training reward's grading).

    A completion whose grading times out or fails counts as wrong; so does a problem whose gold cannot be
    parsed."""
    k = len(completions[0]) if completions else 0
    if any(len(row) != k for row in completions):
        raise ValueError("grade: every problem needs the same number of completions")
    flat = [t for row in completions for t in row]
    rep = lambda xs: [x for x in xs for _ in range(k)]  # noqa: E731
    res = grader.compute([""] * len(flat), flat, columns={"solution": rep(solutions), "answer": rep(answers)})
    return np.nan_to_num(res["accuracy"], nan=0.0).reshape(len(completions), k) > 0.5
