"""pass@k (Chen et al. 2021, Eq. 1) against brute-force enumeration, and avg@k on hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from poer_jax.eval.passk import avg_at_k, pass_at_k, pass_at_k_from_matrix


def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_for_small_n() -> None:
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values_and_large_n() -> None:
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k: every 5-subset holds a correct sample
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    # n = 1000 would overflow a float binomial (C(1000, 500) ~ 1e299 is near the limit, 2000 is past it).
    for n, c, k in [(1000, 3, 10), (2000, 1000, 50), (2000, 1, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)
    got = pass_at_k(np.array([5, 5, 5]), np.array([0, 1, 5]), 2)
    np.testing.assert_allclose(got, [0.0, 0.4, 1.0])


def test_pass_at_k_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least k=4 samples"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= num_correct <= num_samples"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k >= 1"):
        pass_at_k(3, 1, 0)


def test_pass_at_k_from_matrix_and_avg_at_k() -> None:
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    assert pass_at_k_from_matrix(correct, 1) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert pass_at_k_from_matrix(correct, 2) == pytest.approx((0.5 + 5 / 6 + 0.0) / 3)
    assert avg_at_k(correct) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert avg_at_k(correct, k=2) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # ragged: a problem's mean counts once, whatever its number of samples
    assert avg_at_k([[1.0], [0.0, 1.0, 1.0, 1.0]]) == pytest.approx((1.0 + 0.75) / 2)
    with pytest.raises(ValueError, match="problem 0 has only 1 samples"):
        avg_at_k([[1.0], [0.0, 1.0]], k=2)
    with pytest.raises(ValueError, match="empty"):
        avg_at_k([])
