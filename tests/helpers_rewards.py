"""Reward functions for tests/test_rewards.py, loaded by import path in the reward worker processes."""

from __future__ import annotations

import os
import time
from typing import Any


def length_reward(
    prompts: list[Any], completions: list[str], completion_ids: list[list[int]] | None, **columns: Any
) -> list[float]:
    """Number of characters of each completion (checks the TRL signature and the column plumbing)."""
    bonus = columns.get("bonus", [0.0] * len(completions))
    return [float(len(c)) + float(b) for c, b in zip(completions, bonus, strict=True)]


def hang_on_marker(
    prompts: list[Any], completions: list[str], completion_ids: list[list[int]] | None, **columns: Any
) -> list[float | None]:
    """Sleeps forever on a completion containing "HANG", None on "NONE", else 1.0."""
    out: list[float | None] = []
    for c in completions:
        if "HANG" in c:
            while True:
                time.sleep(3600)
        out.append(None if "NONE" in c else 1.0)
    return out


def crash_on_marker(
    prompts: list[Any], completions: list[str], completion_ids: list[list[int]] | None, **columns: Any
) -> list[float]:
    """Kills its own process on "CRASH", raises on "RAISE", else 2.0."""
    for c in completions:
        if "CRASH" in c:
            os._exit(3)
        if "RAISE" in c:
            raise ZeroDivisionError("deliberate failure")
    return [2.0] * len(completions)


def wrong_type(prompts: list[Any], completions: list[str], completion_ids: Any, **columns: Any) -> list[Any]:
    return ["not a number"] * len(completions)


NOT_CALLABLE = 3


def hang_sometimes(prompts: list[Any], completions: list[str], completion_ids: list[list[int]] | None,
                   **columns: Any) -> list[float]:
    """Sleeps forever on about one completion in five (sum of its token ids divisible by 5), else 0.0."""
    out = []
    for ids in completion_ids or [[0]] * len(completions):
        if sum(ids) % 5 == 0:
            while True:
                time.sleep(3600)
        out.append(0.0)
    return out


def infinite_reward(prompts: list[Any], completions: list[str], completion_ids: Any, **columns: Any) -> list[float]:
    """inf for completions with an odd sum of token ids, else 0: a group mixing both has non-finite
    advantages, so the loss is non-finite."""
    return [float("inf") if sum(ids) % 2 else 0.0 for ids in completion_ids]


def spread_on_even_answers(prompts: list[Any], completions: list[str], completion_ids: Any, **columns: Any
                           ) -> list[float]:
    """Completion length for problems with an even answer, 0 otherwise: only those groups have a spread."""
    return [float(len(c)) if int(a) % 2 == 0 else 0.0 for c, a in zip(completions, columns["answer"], strict=True)]


def constant_one(
    prompts: list[Any], completions: list[str], completion_ids: list[list[int]] | None, **columns: Any
) -> list[float]:
    """1.0 for every completion: raw rewards carry no signal, so only reward shaping can spread a group."""
    return [1.0] * len(completions)


def digit_count(prompts: list[Any], completions: list[str], completion_ids: Any, **columns: Any) -> list[float]:
    """Number of digits in the completion: spread even among the random completions of an untrained model,
    so the advantages are not all 0 and the policy moves."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def non_finite_on_marker(prompts: list[Any], completions: list[str], completion_ids: Any, **columns: Any
                         ) -> list[float]:
    """NaN on "NAN", inf on "INF", -inf on "NEGINF", else the completion's length."""
    values = {"NEGINF": float("-inf"), "NAN": float("nan"), "INF": float("inf")}
    return [next((v for k, v in values.items() if k in c), float(len(c))) for c in completions]


def nan_on_odd_ids(prompts: list[Any], completions: list[str], completion_ids: Any, **columns: Any) -> list[float]:
    """NaN for completions with an odd sum of token ids, else 1."""
    return [float("nan") if sum(ids) % 2 else 1.0 for ids in completion_ids]
