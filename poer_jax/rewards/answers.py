"""Answer extraction and grading, shared by the training rewards and the evaluation.

One definition of "the model's answer" is used everywhere, so a training accuracy and an evaluation
accuracy mean the same thing:

* prediction: the contents of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) in the completion,
  matched with balanced braces, read as plain-text math where it is (``sqrt(3)`` -> ``\\sqrt{3}``,
  ``2^(n-1)`` -> ``2^{n-1}``: ``poer_jax.rewards.answer_text.plain_to_latex``), re-wrapped as
  ``\\boxed{...}`` and parsed by math-verify with the open-rs prediction config (LaTeX only, boxed
  first, no anchor-free extraction). Taking only the last
  box (open-rs parses every box and compares their *set*) means that a model which boxes an intermediate
  value and then its final answer is graded on the final answer, and that hedging with several boxes
  never helps: only one of them counts. ``fallback_unboxed=True`` lets math-verify look for an anchored
  answer ("the final answer is ...") when there is no box.
* gold: parsed from the ``solution`` text (math-verify ``LatexExtractionConfig``, ``first_match``, as
  open-rs does) and from the ``answer`` column (read as plain-text math where it is, wrapped in
  ``\\boxed{}`` when it is not already); either may match. The gold *texts* are the ``answer`` column
  and the last box of the solution; the first of them present is the primary one.
* grading, in order:

  1. a prediction equal to a gold text in ``normalize_answer``'s form (whitespace, ``$``, ``\\boxed{}``,
     ``\\text{}``, ``\\left`` / ``\\right``, ``\\dfrac``, a trailing period, case for words) is right:
     a reproduced gold always scores 1;
  2. a primary gold made of words (``Yes``, ``odd``, ``no solution``) is matched as text only (1.): read as
     math it is a product of one-letter symbols, so ``no`` would equal ``on``;
  3. a number with a unit (``10 cm``, ``30^\\circ``, ``50\\%``; ``answer_text.UNITS``) on either side: a
     prediction in another unit is wrong, else the numbers are compared (a bare number may answer
     ``10 cm``). math-verify alone drops units, so ``10 m`` and ``10 cm`` were the same answer;
  4. otherwise ``math_verify.verify(gold, prediction)`` -- the documented argument order (open-rs calls
     it reversed; ``verify`` is asymmetric for assignments and intervals).

  tests/assets/grading_corpus.jsonl holds the pairs this is checked on (docs/grading.md: the table).

math-verify bounds its own time with ``signal.alarm``, which only works on a process's main thread. All
calls here pass ``parsing_timeout=None`` / ``timeout_seconds=None``: callers bound time themselves
(``poer_jax.train.reward_pool`` runs grading in worker processes with a per-item deadline).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

from poer_jax.rewards.answer_text import is_word_answer, normalize_answer, plain_to_latex, split_unit, strip_boxes

__all__ = [
    "Grade",
    "extract_last_boxed",
    "gold_texts",
    "grade_completion",
    "parse_gold",
    "parse_prediction",
    "verify_answer",
    "wrap_boxed",
]

_CONFIG_NAMES = ("GOLD_EXTRACTION_CONFIG", "PRED_EXTRACTION_CONFIG", "NUMBER_EXTRACTION_CONFIG")


@cache
def _math_verify() -> Any:
    """math-verify, imported on the first parse: it imports sympy (~0.35 s), and a process that only hands
    rewards to its worker processes (the trainer, ``python -m poer_jax.evaluate``) never grades itself. The
    reward pool's fork server preloads it once (``reward_pool._PRELOAD``)."""
    import math_verify

    return math_verify


@cache
def _extraction_configs() -> dict[str, tuple[Any, ...]]:
    from math_verify import LatexExtractionConfig, LatexNormalizationConfig

    def latex(units: bool) -> Any:
        return LatexExtractionConfig(
            normalization_config=LatexNormalizationConfig(
                nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=units
            ),
            boxed_match_priority=0,
            try_extract_without_anchor=False,
        )

    return {
        # open-rs gold config: math-verify's default LaTeX extraction on the full reference solution.
        "GOLD_EXTRACTION_CONFIG": (LatexExtractionConfig(),),
        # open-rs prediction config (its `equations=True` is deprecated in latex2sympy2_extended and left out).
        "PRED_EXTRACTION_CONFIG": (latex(units=True),),
        # The numbers of answers with units (the units are compared before): math-verify's own unit stripping
        # off, so that "10m" stays the product 10 m rather than 10.
        "NUMBER_EXTRACTION_CONFIG": (latex(units=False),),
    }


def __getattr__(name: str) -> Any:
    """The three extraction configs (``GOLD_``, ``PRED_``, ``NUMBER_EXTRACTION_CONFIG``), made on first use."""
    if name in _CONFIG_NAMES:
        return _extraction_configs()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parse(text: str, config: str) -> list[Any]:
    return _math_verify().parse(text, extraction_config=_extraction_configs()[config],
                                extraction_mode="first_match", parsing_timeout=None)


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
    when there is no complete box. "Last" is the box that ends last: in ``\\boxed{\\boxed{7}1}`` the
    answer is ``\\boxed{7}1``, not ``7``.
    """
    best: tuple[int, str] | None = None
    for cmd in _BOX_COMMANDS:
        pos = text.find(cmd)
        while pos != -1:
            arg = _box_argument(text, pos + len(cmd))
            if arg is not None and (best is None or arg[1] > best[0]):
                best = (arg[1], arg[0])
            pos = text.find(cmd, pos + 1)
    return None if best is None else best[1]


def _box_argument(text: str, i: int) -> tuple[str, int] | None:
    """(the argument that starts at text[i] (after the command name), the index after it), or None if
    malformed."""
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
        return (text[j:end], end) if end > j else None
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
                return text[j + 1 : k], k + 1
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
    parsed: list[Any] = []
    if solution:
        parsed += _parse(solution, "GOLD_EXTRACTION_CONFIG")
    if answer is not None and answer.strip():
        parsed += _parse(wrap_boxed(plain_to_latex(answer)), "GOLD_EXTRACTION_CONFIG")
    return tuple(parsed)


def _text(answer: str | int | float | None) -> str | None:
    return answer if answer is None or isinstance(answer, str) else str(answer)


def parse_gold(solution: str | None, answer: str | int | float | None = None) -> list[Any]:
    """math-verify parse of the gold: the ``solution``'s and the ``answer``'s (boxed if needed, plain-text
    math read as LaTeX), in that order; a prediction matching either is right.

    Returns an empty list when neither parses. Cached: a question's G samples share one gold parse.
    """
    return list(_parse_gold_cached(solution, _text(answer)))


def gold_texts(solution: str | None, answer: str | int | float | None = None) -> list[str]:
    """The gold as text: the ``answer`` column, then the last box of the ``solution`` (those present)."""
    out: list[str] = []
    answer = _text(answer)
    if answer is not None and answer.strip():
        out.append(extract_last_boxed(answer) or answer.strip())
    boxed = extract_last_boxed(solution) if solution else None
    if boxed is not None and boxed.strip() and boxed.strip() not in out:
        out.append(boxed.strip())
    return out


def parse_prediction(completion: str, fallback_unboxed: bool = False) -> list[Any]:
    """math-verify parse of the completion's last ``\\boxed{}`` (plain-text math read as LaTeX); empty list
    when there is none."""
    boxed = extract_last_boxed(completion)
    if boxed is not None:
        text = "\\boxed{" + plain_to_latex(strip_boxes(boxed)) + "}"
    elif fallback_unboxed:
        text = completion
    else:
        return []
    return _parse(text, "PRED_EXTRACTION_CONFIG")


def verify_answer(gold: Sequence[Any], prediction: Sequence[Any]) -> bool:
    """``math_verify.verify(gold, prediction)`` in the documented order; False if either is empty."""
    if not gold or not prediction:
        return False
    return bool(_math_verify().verify(list(gold), list(prediction), timeout_seconds=None))


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one completion.

    correct: True / False, or None when the gold could not be parsed (the question cannot be graded).
    predicted: the extracted answer text (last box contents), None when the completion has no box.
    """

    correct: bool | None
    predicted: str | None


def _parse_number(text: str) -> list[Any]:
    return _parse("\\boxed{" + plain_to_latex(text) + "}", "NUMBER_EXTRACTION_CONFIG")


def _units_verdict(primary: str, predicted: str) -> bool | None:
    """Step 3 of the grading: None when neither side is a number with a unit."""
    gold_number, gold_unit = split_unit(primary)
    pred_number, pred_unit = split_unit(predicted)
    if gold_unit is None and pred_unit is None:
        return None
    if gold_unit is not None and pred_unit is not None and gold_unit != pred_unit:
        return False
    return verify_answer(_parse_number(gold_number), _parse_number(pred_number))


def grade_completion(
    completion: str,
    solution: str | None = None,
    answer: str | int | float | None = None,
    fallback_unboxed: bool = False,
) -> Grade:
    """Grade one completion against a row's gold (``solution`` and ``answer``; the module docstring gives the
    steps). ``correct`` is None when the row has no gold at all."""
    texts = gold_texts(solution, answer)
    gold = parse_gold(solution, answer)
    predicted = extract_last_boxed(completion)
    if not gold and not texts:
        return Grade(correct=None, predicted=predicted)
    if predicted is not None and texts:
        key = normalize_answer(predicted)
        if any(key == normalize_answer(t) for t in texts):
            return Grade(correct=True, predicted=predicted)
        if is_word_answer(texts[0]):
            return Grade(correct=False, predicted=predicted)
        by_unit = _units_verdict(texts[0], predicted)
        if by_unit is not None:
            return Grade(correct=by_unit, predicted=predicted)
    pred = parse_prediction(completion, fallback_unboxed=fallback_unboxed)
    return Grade(correct=verify_answer(gold, pred), predicted=predicted)
