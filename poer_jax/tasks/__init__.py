"""Built-in tasks, generated locally (no download), and a tiny local tokenizer (``tiny_tokenizer``).

* ``arithmetic`` (``toy``): short worked arithmetic (~40-token answers), whose deciding tokens come first.
* ``chain`` (``chain``): 14-22 steps of one skill (160-248-token answers), every step deciding the answer:
  the task of the CPU demo, in POER's regime (truncating the last ~10 % of an answer still matters).

``make_task_splits(name, ...)`` maps the ``toy.*`` config knobs onto a task; ``task_completion(name, row)``
is the supervised warm-start target; ``TASKS[name].word_tokens`` are the multi-character tokens of its
tokenizer.

Owns: the built-in tasks' rows, completions and error kinds, and their tokenizer.
May import: the leaf modules only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from poer_jax.tasks.chain import CHAIN_ERRORS, chain_error

__all__ = ["TASKS", "BuiltinTask", "error_fractions", "make_task_splits", "task_capacity", "task_completion"]

Rows = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class BuiltinTask:
    """A generated task: ``splits(num_train, num_test, seed, knobs)`` -> (train, test) rows in open-rs's
    columns; ``completion(row)`` -> the warm-start target; ``word_tokens``: one token each in its tokenizer."""

    name: str
    splits: Callable[[int, int, int, dict[str, Any]], tuple[Rows, Rows]]
    completion: Callable[[dict[str, str]], str]
    word_tokens: tuple[str, ...] = ()
    capacity: Callable[[dict[str, Any]], int] | None = None  # distinct problems the knobs allow (None: plenty)
    # the kinds of error a completion can make, and (problem, completion) -> its first error's kind
    errors: tuple[str, ...] = ()
    error: Callable[[str, str], str] | None = None


def _arithmetic_splits(num_train: int, num_test: int, seed: int, knobs: dict[str, Any]) -> tuple[Rows, Rows]:
    from poer_jax.tasks.toy import ToyTaskConfig, make_toy_splits

    cfg = ToyTaskConfig(min_value=0, max_value=knobs["max_value"], min_operands=knobs["min_operands"],
                        max_operands=knobs["max_operands"], word_problem_fraction=knobs["word_problem_fraction"])
    return make_toy_splits(num_train, num_test, seed=seed, cfg=cfg)


def _chain_splits(num_train: int, num_test: int, seed: int, knobs: dict[str, Any]) -> tuple[Rows, Rows]:
    from poer_jax.tasks.chain import ChainTaskConfig, make_chain_splits

    cfg = ChainTaskConfig(min_steps=knobs["min_operands"], max_steps=knobs["max_operands"],
                          max_constant=knobs["max_value"])
    return make_chain_splits(num_train, num_test, seed=seed, cfg=cfg)


def _chain_capacity(knobs: dict[str, Any]) -> int:
    from poer_jax.tasks.chain import ChainTaskConfig, num_chain_problems

    return num_chain_problems(ChainTaskConfig(min_steps=knobs["min_operands"], max_steps=knobs["max_operands"],
                                              max_constant=knobs["max_value"]))


def _chain_completion(row: dict[str, str]) -> str:
    from poer_jax.tasks.chain import chain_completion

    return chain_completion(row)


def _chain_error(problem: str, completion: str) -> str:
    return chain_error(problem, completion)[0]


def _arithmetic_completion(row: dict[str, str]) -> str:
    from poer_jax.tasks.toy import toy_completion

    return toy_completion(row)


TASKS: dict[str, BuiltinTask] = {
    "arithmetic": BuiltinTask("arithmetic", _arithmetic_splits, _arithmetic_completion),
    "chain": BuiltinTask("chain", _chain_splits, _chain_completion, word_tokens=("<think>", "</think>", "\\boxed{"),
                         capacity=_chain_capacity, errors=CHAIN_ERRORS, error=_chain_error),
}


def _task(name: str) -> BuiltinTask:
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def make_task_splits(name: str, num_train: int, num_test: int, seed: int, *, max_value: int, min_operands: int,
                     max_operands: int, word_problem_fraction: float = 0.0) -> tuple[Rows, Rows]:
    """Train and held-out rows of task ``name`` from the ``toy.*`` knobs: the operand range (a chain's constant is
    at most ``max_value``) and the number of operands (a chain has ``min_operands`` .. ``max_operands`` steps)."""
    knobs = dict(max_value=max_value, min_operands=min_operands, max_operands=max_operands,
                 word_problem_fraction=word_problem_fraction)
    return _task(name).splits(num_train, num_test, seed, knobs)


def task_capacity(name: str, *, max_value: int, min_operands: int, max_operands: int) -> int | None:
    """How many distinct problems task ``name`` has at these knobs (None: more than any run asks for)."""
    task = _task(name)
    knobs = dict(max_value=max_value, min_operands=min_operands, max_operands=max_operands)
    return None if task.capacity is None else task.capacity(knobs)


def task_completion(name: str, row: dict[str, str]) -> str:
    """The supervised warm-start target of a row of task ``name``."""
    return _task(name).completion(row)


def error_fractions(name: str, problems: list[str], completions: list[list[str]]) -> dict[str, float]:
    """Fraction of all completions whose first error is each of the task's error kinds (``BuiltinTask.errors``;
    {} for a task without them): where a policy goes wrong, e.g. inside or outside POER's reused prefix."""
    task = _task(name)
    if task.error is None:
        return {}
    counts = dict.fromkeys(task.errors, 0)
    for problem, row in zip(problems, completions, strict=True):
        for completion in row:
            counts[task.error(problem, completion)] += 1
    total = max(sum(counts.values()), 1)
    return {kind: c / total for kind, c in counts.items()}
