"""Sampling statistics: empirical frequencies match softmax(logits / T) and the exact top-k / top-p
truncations (chi-square, fixed seed), the sort-free top-p threshold equals the sorted nucleus, and the
returned log-probs are those of the distribution sampled from."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import chi2

from poer_jax.sampler import SamplingParams, sample_tokens, top_p_threshold

LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0], np.float32)
DRAWS = 40_000


def reference_distribution(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """Sort-based HF-convention reference: temperature, top-k, then nucleus on the renormalised rest."""
    z = logits.astype(np.float64) / sp.temperature
    order = np.argsort(-z, kind="stable")
    keep = order[: sp.top_k] if sp.top_k else order
    p = np.exp(z[keep] - z[keep].max())
    p /= p.sum()
    keep = keep[(np.cumsum(p) - p) < sp.top_p]
    out = np.zeros_like(z)
    out[keep] = np.exp(z[keep] - z[keep].max())
    return out / out.sum()


@partial(jax.jit, static_argnums=2)
def _draw(logits: jax.Array, key: jax.Array, sp: SamplingParams) -> tuple[jax.Array, ...]:
    keys = jax.random.split(key, DRAWS)
    return sample_tokens(jnp.broadcast_to(logits, (DRAWS, logits.shape[0])), keys, sp)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = (((counts[support] - expected) ** 2) / expected).sum()
    if (counts[~support] > 0).any():
        return 0.0
    return float(chi2.sf(stat, support.sum() - 1))


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=0.8, top_p=0.7),
        SamplingParams(temperature=1.5, top_p=0.9),
        SamplingParams(temperature=1.2, top_k=6, top_p=0.75),
    ],
)
def test_frequencies_match_distribution(sp: SamplingParams) -> None:
    tok, lp, plp = (np.asarray(x) for x in _draw(jnp.asarray(LOGITS), jax.random.key(1234), sp))
    probs = reference_distribution(LOGITS, sp)
    counts = np.bincount(tok, minlength=LOGITS.size).astype(np.float64)
    assert chi_square_pvalue(counts, probs) > 1e-3, (counts / DRAWS, probs)
    np.testing.assert_allclose(lp, np.log(probs[tok]), atol=1e-5)  # sampling distribution's log-prob
    full = reference_distribution(LOGITS, SamplingParams(temperature=sp.temperature))
    np.testing.assert_allclose(plp, np.log(full[tok]), atol=1e-5)  # untruncated policy log-prob
    if sp.top_k or sp.top_p < 1:  # the test has power: the untruncated distribution is rejected
        assert chi_square_pvalue(counts, full) < 1e-6


def test_greedy_is_argmax_with_policy_logprob() -> None:
    logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3
    tok, lp, plp = sample_tokens(
        logits, jax.random.split(jax.random.key(1), 16), SamplingParams(temperature=0)
    )
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(logits), -1))
    assert (np.asarray(lp) == 0).all()
    ref = jax.nn.log_softmax(logits)[jnp.arange(16), tok]
    np.testing.assert_allclose(np.asarray(plp), np.asarray(ref), atol=1e-6)


def test_argmax_is_numpys_first_index_of_the_maximum() -> None:
    """``sampling.argmax`` (two plain reductions) picks what ``np.argmax`` picks: ties go to the first index,
    -inf rows to index 0, and a row holding NaN to its first NaN."""
    from poer_jax.sampler.sampling import argmax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 1000)).astype(np.float32)
    x[1, [5, 17, 900]] = 10.0  # tie
    x[2] = -np.inf
    x[3, [40, 60]] = np.nan
    x[4, :] = 3.0  # all equal
    x[5, -1] = np.inf
    x[6] = np.round(x[6])  # many ties below the maximum
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(got[:4], [int(np.argmax(x[0])), 5, 0, 40])



@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_top_p_threshold_equals_sorted_nucleus(scale: float) -> None:
    V = 3000
    logits = np.asarray(jax.random.normal(jax.random.key(int(scale * 10)), (6, V))) * scale
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    for top_p in (0.05, 0.5, 0.9, 0.99, 0.999):
        tau = np.asarray(top_p_threshold(jnp.asarray(probs), top_p))
        for r in range(probs.shape[0]):
            order = np.argsort(-probs[r], kind="stable")
            p = probs[r][order]
            ref = set(order[(np.cumsum(p, dtype=np.float64) - p) < top_p].tolist())
            got = set(np.nonzero(probs[r] >= tau[r])[0].tolist())
            assert got == ref, (scale, top_p, r, len(got), len(ref))
