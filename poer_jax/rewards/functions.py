"""Reward functions: accuracy (math-verify), format, cosine length, and user functions by import path.

Every function is offered twice:

* in TRL's batch signature ``f(prompts, completions, completion_ids, **dataset_columns) -> list[float |
  None]`` (``accuracy_reward``, ``format_reward``, ``make_cosine_reward(...)``), so they can be used and
  tested on their own, and so a user function written for TRL drops in unchanged;
* as a per-item evaluator over a ``RewardItem`` (``resolve_reward``), which is what the worker processes
  of ``poer_jax.train.reward_pool`` run under a per-item deadline. Within one item the accuracy and the
  cosine reward share a single math-verify grading.

Rewards (open-rs, the paper's training recipe; the POER paper adds the group length reward of its
Eq. (10), which lives with the advantage code, not here):

* accuracy: 1.0 if ``verify(gold, prediction)`` else 0.0 (``poer_jax.rewards.answers``); None when the
  gold cannot be parsed (the row cannot be graded; open-rs gives 1.0 there, inflating the mean).
* format: 1.0 if the completion contains ``"\\n</think>\\n"`` exactly once, else 0.0. This is open-rs's
  rule for R1-distilled models, whose chat template already opens ``<think>\\n`` in the generation
  prompt, so a well-formed completion is ``reasoning \\n</think>\\n answer``. The rule is fixed (no
  options) so that a "format" number means the same thing in every run.
* cosine: r = v_end + 0.5 (v_start - v_end) (1 + cos(pi * min(len, max_len) / max_len)), with len the
  completion length in **tokens**. Correct answers go from ``max_value_correct`` (1.0) at len 0 down to
  ``min_value_correct`` (0.5) at max_len; wrong answers go from ``min_value_wrong`` (0.0) at len 0 to
  ``max_value_wrong`` (-0.5) at max_len (open-r1's parameter names, swapped for wrong answers exactly as
  open-rs does). Unlike open-rs (characters, no clamp: cos is periodic, so a 2*max_len answer scored like
  an empty one), the length is clamped to max_len.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poer_jax.rewards.answers import Grade, grade_completion

__all__ = [
    "BUILTIN_REWARDS",
    "RewardItem",
    "accuracy_reward",
    "completion_text",
    "cosine_scaled_reward",
    "format_reward",
    "load_reward_function",
    "make_cosine_reward",
    "resolve_reward",
    "reward_name",
]

THINK_CLOSE = "\n</think>\n"
BUILTIN_REWARDS = ("accuracy", "format", "cosine")
# Built-ins that read the math-verify grade: if grading an item hangs for one of them, the others are
# not retried on that item (they would hang the same way).
GRADE_REWARDS = frozenset({"accuracy", "cosine"})


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or TRL's conversational form (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def _column(values: Sequence[Any] | None, name: str, n: int) -> list[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def _grade_value(grade: Grade) -> float | None:
    return None if grade.correct is None else float(grade.correct)


def accuracy_reward(
    completions: Sequence[Any],
    solution: Sequence[Any] | None = None,
    answer: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """TRL-signature accuracy: 1.0 / 0.0 per completion, None when the row's gold does not parse."""
    n = len(completions)
    sols = _column(solution, "solution", n)
    answers = _column(answer, "answer", n)
    return [
        _grade_value(grade_completion(completion_text(c), s, a))
        for c, s, a in zip(completions, sols, answers, strict=True)
    ]


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL-signature format reward: 1.0 iff ``"\\n</think>\\n"`` occurs exactly once."""
    return [1.0 if completion_text(c).count(THINK_CLOSE) == 1 else 0.0 for c in completions]


def cosine_scaled_reward(
    correct: Any,
    length: Any,
    max_len: int,
    min_value_wrong: float = 0.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
) -> np.ndarray:
    """Cosine length reward (open-r1 / open-rs), vectorised over numpy arrays, length clamped to max_len.

    r = v_end + 0.5 (v_start - v_end) (1 + cos(pi * min(len, max_len) / max_len)), where
    (v_start, v_end) = (max_value_correct, min_value_correct) for correct answers and
    (min_value_wrong, max_value_wrong) for wrong ones.
    """
    if max_len <= 0:
        raise ValueError(f"cosine reward max_len must be positive, got {max_len}")
    correct = np.asarray(correct, dtype=bool)
    length = np.asarray(length, dtype=np.float64)
    if np.any(length < 0):
        raise ValueError("cosine reward: negative completion length")
    progress = np.minimum(length, float(max_len)) / float(max_len)
    half = 0.5 * (1.0 + np.cos(math.pi * progress))
    v_start = np.where(correct, max_value_correct, min_value_wrong)
    v_end = np.where(correct, min_value_correct, max_value_wrong)
    return v_end + (v_start - v_end) * half


def make_cosine_reward(max_len: int, **values: float) -> Callable[..., list[float | None]]:
    """TRL-signature cosine reward over token lengths ``len(completion_ids[i])``."""
    _check_cosine_kwargs({"max_len": max_len, **values})

    def cosine_reward(
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        solution: Sequence[Any] | None = None,
        answer: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if completion_ids is None:
            raise ValueError("cosine reward needs completion_ids (it measures length in tokens)")
        acc = accuracy_reward(completions, solution=solution, answer=answer)
        out: list[float | None] = []
        for a, ids in zip(acc, completion_ids, strict=True):
            out.append(
                None if a is None else float(cosine_scaled_reward(a > 0.5, len(ids), max_len, **values))
            )
        return out

    return cosine_reward


_COSINE_KEYS = {"max_len", "min_value_wrong", "max_value_wrong", "min_value_correct", "max_value_correct"}


def _check_cosine_kwargs(kwargs: Mapping[str, Any]) -> None:
    unknown = set(kwargs) - _COSINE_KEYS
    if unknown:
        raise ValueError(f"cosine reward: unknown options {sorted(unknown)}; known: {sorted(_COSINE_KEYS)}")
    if "max_len" not in kwargs or kwargs["max_len"] is None:
        raise ValueError("cosine reward needs max_len (in tokens), e.g. the max completion length")
    if int(kwargs["max_len"]) <= 0:
        raise ValueError(f"cosine reward max_len must be positive, got {kwargs['max_len']}")


def load_reward_function(path: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` or ``"/path/to/file.py:function"``.

    Raises ValueError naming the path when the module, the attribute or its callability is missing.
    """
    module_part, sep, attr = path.rpartition(":")
    if not sep or not module_part or not attr:
        raise ValueError(f"reward function {path!r}: expected 'module:function' or 'file.py:function'")
    try:
        if module_part.endswith(".py"):
            file = Path(module_part)
            if not file.is_file():
                raise FileNotFoundError(f"no such file {file}")
            mod_name = f"_poer_reward_{abs(hash(str(file.resolve())))}"
            module = sys.modules.get(mod_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(mod_name, file)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {file}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except Exception as e:
        raise ValueError(f"reward function {path!r}: cannot import {module_part!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {path!r}: module {module_part!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: {attr!r} is not callable")
    return fn


def reward_name(name: str) -> str:
    """Metric name of a reward spec: the built-in name, or the function's name for an import path."""
    return name if name in BUILTIN_REWARDS else name.rpartition(":")[2]


@dataclass
class RewardItem:
    """One completion to score, with its prompt, token ids (or just their count) and the row's columns."""

    prompt: Any
    completion: Any
    completion_ids: Sequence[int] | None
    columns: dict[str, Any] = field(default_factory=dict)
    num_tokens: int | None = None
    _grade: Grade | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """Completion length in tokens."""
        if self.num_tokens is not None:
            return self.num_tokens
        if self.completion_ids is None:
            raise ValueError("cosine reward needs completion_ids or their lengths (it counts tokens)")
        return len(self.completion_ids)

    @property
    def text(self) -> str:
        return completion_text(self.completion)

    def grade(self) -> Grade:
        if self._grade is None:
            self._grade = grade_completion(
                self.text, self.columns.get("solution"), self.columns.get("answer")
            )
        return self._grade


ItemReward = Callable[[RewardItem], "float | None"]


def _to_reward_value(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool | int | float | np.floating | np.integer):
        return float(value)
    raise TypeError(
        f"reward function {name!r} returned {value!r:.100} ({type(value).__name__}); expected a float or None"
    )


def resolve_reward(name: str, kwargs: Mapping[str, Any] | None = None) -> ItemReward:
    """Per-item evaluator for a built-in name or a ``module:function`` / ``file.py:function`` path.

    A user function keeps TRL's batch signature but is called with batches of one completion (lists of
    length 1 for prompts, completions, completion_ids and every dataset column), so that each completion
    gets its own deadline in the reward pool; it must return a list of one float or None.
    """
    kwargs = dict(kwargs or {})
    if name == "accuracy" or name == "format":
        if kwargs:
            raise ValueError(f"reward {name!r} takes no options, got {sorted(kwargs)}")
        if name == "accuracy":
            return lambda item: _grade_value(item.grade())
        return lambda item: 1.0 if item.text.count(THINK_CLOSE) == 1 else 0.0
    if name == "cosine":
        _check_cosine_kwargs(kwargs)
        max_len = int(kwargs.pop("max_len"))

        def cosine_item(item: RewardItem) -> float | None:
            correct = item.grade().correct
            if correct is None:
                return None
            return float(cosine_scaled_reward(correct, item.length, max_len, **kwargs))

        return cosine_item
    if ":" not in name:
        raise ValueError(
            f"unknown reward {name!r}: built-ins are {list(BUILTIN_REWARDS)}, "
            "or give an import path 'module:function'"
        )
    if kwargs:
        raise ValueError(f"reward {name!r}: options are only for built-in rewards, got {sorted(kwargs)}")
    fn = load_reward_function(name)

    def user_item(item: RewardItem) -> float | None:
        columns = {k: [v] for k, v in item.columns.items()}
        ids = None if item.completion_ids is None else [list(item.completion_ids)]
        out = fn(prompts=[item.prompt], completions=[item.completion], completion_ids=ids, **columns)
        if not isinstance(out, Sequence) or isinstance(out, str) or len(out) != 1:
            raise TypeError(
                f"reward function {name!r} must return a list with one value per completion, got {out!r:.200}"
            )
        return _to_reward_value(out[0], name)

    return user_item
