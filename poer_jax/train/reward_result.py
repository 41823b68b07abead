"""What a batch of rewards is: the functions asked for (:class:`RewardSpec`), their values and counts
(:class:`RewardResult`, with its TRL-style metrics), and the error a failing function raises
(:class:`RewardFunctionError`). ``poer_jax.train.reward_pool`` computes them.

The weighted sum follows TRL: total = nansum_j(w_j * r_j), where a function's None (not applicable) is NaN and so
excluded (``none_policy="nan"``), or 0 (``none_policy="zero"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RewardFunctionError", "RewardResult", "RewardSpec"]


class RewardFunctionError(RuntimeError):
    """A reward function raised (``on_error="raise"``) or returned an invalid value."""


@dataclass(frozen=True)
class RewardSpec:
    """A reward function: a built-in name ("accuracy", "format", "cosine") or an import path
    ("package.module:function" / "path/file.py:function"), its weight in the sum, and built-in options
    (cosine: ``max_len`` in tokens, ``min_value_wrong``, ``max_value_wrong``, ``min_value_correct``,
    ``max_value_correct``)."""

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RewardResult:
    """Rewards of one batch: ``per_function[i, j]`` for completion i and function ``names[j]`` (NaN =
    not applicable, when ``none_policy="nan"``), and ``total[i] = nansum_j(weights[j] *
    per_function[i, j])``; per-function counts of timeouts, errors, non-finite returns and None values.
    ``non_finite_mask[i, j]`` marks the entries where the function returned NaN / inf and ``per_function``
    holds ``error_reward`` in its place."""

    names: list[str]
    weights: np.ndarray
    per_function: np.ndarray
    total: np.ndarray
    timeouts: dict[str, int]
    errors: dict[str, int]
    nones: dict[str, int]
    first_errors: dict[str, str] = field(default_factory=dict)  # function -> its first failure, with traceback
    deadline_cut: int = 0  # calls given timeout_reward because the batch's deadline passed
    non_finite: dict[str, int] = field(default_factory=dict)  # function -> NaN / inf values it returned
    non_finite_mask: np.ndarray | None = None  # [N, F] bool, None: no non-finite value

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"no reward named {name!r}; have {self.names}")
        return self.per_function[:, self.names.index(name)]

    def metrics(self) -> dict[str, float]:
        """TRL-style metrics, every value finite: ``rewards/<fn>/{mean,std}`` over the finite values of the
        function (a None and a NaN / inf it returned are left out; a timeout or an error counts at the value
        it was given) with ``rewards/<fn>/count``, how many that is (mean and std are absent when it is 0);
        ``rewards/<fn>/{timeouts,errors,non_finite}``, ``rewards/non_finite`` (all functions), ``reward``."""
        out: dict[str, float] = {}
        for j, name in enumerate(self.names):
            col = self.per_function[:, j]
            keep = np.isfinite(col)
            if self.non_finite_mask is not None:
                keep &= ~self.non_finite_mask[:, j]
            valid = col[keep]
            out[f"rewards/{name}/count"] = float(valid.size)
            if valid.size:
                out[f"rewards/{name}/mean"] = float(valid.mean())
                out[f"rewards/{name}/std"] = float(valid.std())
            out[f"rewards/{name}/timeouts"] = float(self.timeouts[name])
            out[f"rewards/{name}/errors"] = float(self.errors[name])
            out[f"rewards/{name}/non_finite"] = float(self.non_finite.get(name, 0))
        total = self.total[np.isfinite(self.total)]
        if total.size:
            out["reward"] = float(total.mean())
        out["rewards/non_finite"] = float(sum(self.non_finite.values()))
        out["rewards/deadline_cut"] = float(self.deadline_cut)
        return out
