"""Answer extraction and grading, shared by the training rewards and the evaluation.

One definition of "the model's answer" is used everywhere, so a training accuracy and an evaluation
accuracy mean the same thing:

* prediction: the contents of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) in the completion,
  matched with balanced braces, re-wrapped as ``\\boxed{...}`` and parsed by math-verify with the
  open-rs prediction config (LaTeX only, boxed first, no anchor-free extraction). Taking only the last
  box (open-rs parses every box and compares their *set*) means that a model which boxes an intermediate
  value and then its final answer is graded on the final answer, and that hedging with several boxes
  never helps: only one of them counts. ``fallback_unboxed=True`` lets math-verify look for an anchored
  answer ("the final answer is ...") when there is no box.
* gold: parsed from the ``solution`` text (math-verify ``LatexExtractionConfig``, ``first_match``, as
  open-rs does), falling back to the ``answer`` column, wrapped in ``\\boxed{}`` when it is not already.
* grading: ``math_verify.verify(gold, prediction)`` -- the documented argument order (open-rs calls it
  reversed; ``verify`` is asymmetric for assignments and intervals).

math-verify bounds its own time with ``signal.alarm``, which only works on a process's main thread. All
calls here pass ``parsing_timeout=None`` / ``timeout_seconds=None``: callers bound time themselves
(``poer_jax.train.reward_pool`` runs grading in worker processes with a per-item deadline).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from math_verify import LatexExtractionConfig, LatexNormalizationConfig, parse, verify

__all__ = [
    "GOLD_EXTRACTION_CONFIG",
    "PRED_EXTRACTION_CONFIG",
    "Grade",
    "extract_last_boxed",
    "grade_completion",
    "parse_gold",
    "parse_prediction",
    "verify_answer",
    "wrap_boxed",
]

# open-rs gold config: math-verify's default LaTeX extraction on the full reference solution.
GOLD_EXTRACTION_CONFIG = (LatexExtractionConfig(),)

# open-rs prediction config (its `equations=True` is deprecated in latex2sympy2_extended and left out).
PRED_EXTRACTION_CONFIG = (
    LatexExtractionConfig(
        normalization_config=LatexNormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    ),
)

_BOX_COMMANDS = ("\\boxed", "\\fbox")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def extract_last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` with balanced braces.

    Escaped braces (``\\{``, ``\\}``) do not count towards the balance. ``\\boxed 5`` (argument without
    braces, as some models write) returns the token up to the next whitespace or ``$``. A box that is
    never closed (a truncated completion) is ignored in favour of an earlier complete one; returns None
    when there is no complete box.
    """
    starts: list[tuple[int, str]] = []
    for cmd in _BOX_COMMANDS:
        pos = text.find(cmd)
        while pos != -1:
            starts.append((pos, cmd))
            pos = text.find(cmd, pos + 1)
    for pos, cmd in sorted(starts, reverse=True):
        content = _box_argument(text, pos + len(cmd))
        if content is not None:
            return content
    return None


def _box_argument(text: str, i: int) -> str | None:
    """The argument that starts at text[i] (after the command name), or None if malformed."""
    n = len(text)
    if i < n and text[i].isalpha():
        return None  # another command such as \boxedfoo
    j = i
    while j < n and text[j] == " ":
        j += 1
    if j >= n:
        return None
    if text[j] != "{":
        if j == i:
            return None
        end = j
        while end < n and not text[end].isspace() and text[end] != "$":
            end += 1
        return text[j:end] or None
    depth = 0
    k = j
    while k < n:
        ch = text[k]
        if ch == "\\":
            k += 2  # skip the escaped character, e.g. \{ or \}
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
        k += 1
    return None


def wrap_boxed(answer: str) -> str:
    """``answer`` wrapped as ``\\boxed{answer}`` unless it already contains a box."""
    answer = answer.strip()
    if any(cmd in answer for cmd in _BOX_COMMANDS):
        return answer
    return "\\boxed{" + answer + "}"


@lru_cache(maxsize=4096)
def _parse_gold_cached(solution: str | None, answer: str | None) -> tuple[Any, ...]:
    if solution:
        parsed = parse(
            solution,
            extraction_config=GOLD_EXTRACTION_CONFIG,
            extraction_mode="first_match",
            parsing_timeout=None,
        )
        if parsed:
            return tuple(parsed)
    if answer is not None and answer.strip():
        parsed = parse(
            wrap_boxed(answer),
            extraction_config=GOLD_EXTRACTION_CONFIG,
            extraction_mode="first_match",
            parsing_timeout=None,
        )
        return tuple(parsed)
    return ()


def parse_gold(solution: str | None, answer: str | int | float | None = None) -> list[Any]:
    """math-verify parse of the gold: from ``solution``, else from ``answer`` (boxed if needed).

    Returns an empty list when neither parses. Cached: a question's G samples share one gold parse.
    """
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    return list(_parse_gold_cached(solution, answer))


def parse_prediction(completion: str, fallback_unboxed: bool = False) -> list[Any]:
    """math-verify parse of the completion's last ``\\boxed{}``; empty list when there is none."""
    boxed = extract_last_boxed(completion)
    if boxed is not None:
        text = "\\boxed{" + boxed + "}"
    elif fallback_unboxed:
        text = completion
    else:
        return []
    return parse(
        text,
        extraction_config=PRED_EXTRACTION_CONFIG,
        extraction_mode="first_match",
        parsing_timeout=None,
    )


def verify_answer(gold: Sequence[Any], prediction: Sequence[Any]) -> bool:
    """``math_verify.verify(gold, prediction)`` in the documented order; False if either is empty."""
    if not gold or not prediction:
        return False
    return bool(verify(list(gold), list(prediction), timeout_seconds=None))


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one completion.

    correct: True / False, or None when the gold could not be parsed (the question cannot be graded).
    predicted: the extracted answer text (last box contents), None when the completion has no box.
    """

    correct: bool | None
    predicted: str | None


def grade_completion(
    completion: str,
    solution: str | None = None,
    answer: str | int | float | None = None,
    fallback_unboxed: bool = False,
) -> Grade:
    """Grade one completion against a row's gold (``solution`` first, then ``answer``)."""
    gold = parse_gold(solution, answer)
    predicted = extract_last_boxed(completion)
    if not gold:
        return Grade(correct=None, predicted=predicted)
    pred = parse_prediction(completion, fallback_unboxed=fallback_unboxed)
    return Grade(correct=verify_answer(gold, pred), predicted=predicted)
