"""Did accuracy change? A paired test over problems (each problem evaluated before and after).

For problems i = 1..n with accuracies a_i (before) and b_i (after), each the mean of that problem's k
samples, the statistic is the mean difference d = (1/n) sum_i (b_i - a_i). Under the null hypothesis
"training changed nothing" each problem's pair is exchangeable, so d_i = b_i - a_i is as likely as -d_i;
the sign-flip randomisation test draws ``resamples`` random sign vectors s and reports

    p = (1 + #{s : (1/n) sum_i s_i d_i >= d}) / (1 + resamples)      (one-sided, "after is better")

(two-sided: |.| on both sides). It needs no normality (unlike a paired t-test) and, with k = 1, is the
randomisation version of McNemar's test: only problems whose verdict changed contribute.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["PairedTest", "paired_sign_flip_test"]


@dataclasses.dataclass(frozen=True)
class PairedTest:
    n: int  # problems
    before: float  # mean accuracy
    after: float
    mean_difference: float
    p_value: float
    alternative: str

    def summary(self) -> str:
        return (f"held-out accuracy {self.before:.3f} -> {self.after:.3f} over {self.n} problems "
                f"(paired sign-flip test, {self.alternative}: p = {self.p_value:.2g})")


def paired_sign_flip_test(before: np.ndarray, after: np.ndarray, *, alternative: str = "greater",
                          resamples: int = 100_000, seed: int = 0) -> PairedTest:
    """``before`` / ``after``: [n] or [n, k] per-problem correctness (bool or float), same problems in the same
    order. ``alternative``: "greater" (after > before), "less" or "two-sided"."""
    a = np.asarray(before, np.float64)
    b = np.asarray(after, np.float64)
    if a.shape[:1] != b.shape[:1] or a.ndim not in (1, 2) or b.ndim not in (1, 2) or a.shape[0] == 0:
        raise ValueError(f"paired test: need the same problems before and after, got shapes {a.shape} and {b.shape}")
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"paired test: alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    if resamples < 1:
        raise ValueError(f"paired test: resamples must be >= 1, got {resamples}")
    a = a.mean(axis=1) if a.ndim == 2 else a
    b = b.mean(axis=1) if b.ndim == 2 else b
    d = b - a
    observed = d.mean()
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 10_000):  # bounded memory: 10k sign vectors at a time
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(10_000, resamples - start), d.size))
        flipped = signs @ d / d.size
        if alternative == "greater":
            hits += int(np.sum(flipped >= observed - 1e-12))
        elif alternative == "less":
            hits += int(np.sum(flipped <= observed + 1e-12))
        else:
            hits += int(np.sum(np.abs(flipped) >= abs(observed) - 1e-12))
    return PairedTest(n=int(d.size), before=float(a.mean()), after=float(b.mean()), mean_difference=float(observed),
                      p_value=(1 + hits) / (1 + resamples), alternative=alternative)
