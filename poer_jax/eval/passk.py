"""pass@k and avg@k over sampled answers.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Eq. 1): with n samples per
problem of which c are correct, the unbiased estimate of P(at least one of k samples is correct) is

    pass@k = 1 - C(n - c, k) / C(n, k),

computed in the numerically stable product form 1 - prod_{i = n-c+1}^{n} (1 - k / i) (no huge binomials),
and exactly 1 when n - c < k. The POER paper reports pass@N curves on AIME24 (Figs. 6-7).

avg@k: the mean accuracy over k samples per problem, averaged over problems (for one sample, plain
accuracy; the paper's tables use one sample per problem at temperature 0.6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["avg_at_k", "pass_at_k", "pass_at_k_from_matrix"]


def pass_at_k(
    num_samples: int | Sequence[int] | np.ndarray, num_correct: int | Sequence[int] | np.ndarray, k: int
) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al. 2021, Eq. 1), vectorised over problems.

    Args:
      num_samples: n per problem (scalar or [P]).
      num_correct: c per problem (scalar or [P]), 0 <= c <= n.
      k: 1 <= k <= n for every problem.
    Returns: float64 array of shape broadcast(n, c).
    """
    n = np.asarray(num_samples, dtype=np.int64)
    c = np.asarray(num_correct, dtype=np.int64)
    n, c = np.broadcast_arrays(n, c)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass@k needs 0 <= num_correct <= num_samples for every problem")
    if np.any(n < k):
        raise ValueError(f"pass@k needs at least k={k} samples per problem, got min n={int(n.min())}")
    out = np.ones(n.shape, dtype=np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci >= k:
            # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
            out[idx] = 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64)))
    return out


def pass_at_k_from_matrix(correct: np.ndarray | Sequence[Sequence[bool]], k: int) -> float:
    """Mean pass@k over problems from a [P, n] matrix (or ragged rows) of per-sample correctness."""
    rows = [np.asarray(r, dtype=bool) for r in correct]
    if not rows:
        raise ValueError("pass@k of an empty set of problems")
    n = [len(r) for r in rows]
    c = [int(r.sum()) for r in rows]
    return float(pass_at_k(n, c, k).mean())


def avg_at_k(correct: np.ndarray | Sequence[Sequence[float]], k: int | None = None) -> float:
    """avg@k: mean over problems of the mean correctness of their first k samples (all when k is None).

    Accepts a [P, n] matrix or ragged rows; rows with fewer than k samples are an error.
    """
    rows = [np.asarray(r, dtype=np.float64) for r in correct]
    if not rows:
        raise ValueError("avg@k of an empty set of problems")
    if k is not None:
        if k < 1:
            raise ValueError(f"avg@k needs k >= 1, got {k}")
        short = [i for i, r in enumerate(rows) if len(r) < k]
        if short:
            raise ValueError(f"avg@k with k={k}: problem {short[0]} has only {len(rows[short[0]])} samples")
        rows = [r[:k] for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("avg@k: a problem has no samples")
    return float(np.mean([r.mean() for r in rows]))
