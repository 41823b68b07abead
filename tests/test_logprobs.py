"""Chunked log-probs / entropies equal a naive full-logits computation, in value and gradient."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model import QwenConfig, forward_logits, init_params, positions_from_mask
from poer_jax.rl.logprobs import token_logprobs, token_logprobs_from_hidden

CFG = QwenConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8)
B, T = 3, 16
TEMP = 0.7


def _naive(params, cfg, tokens, mask, temperature):
    """Full [B, T, V] logits: logp[t] = log_softmax(z[t-1] / tau)[tokens[t]], entropy likewise, 0 at t = 0."""
    logits = forward_logits(params, cfg, tokens, positions_from_mask(mask), mask) / temperature
    logq = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    lp = jnp.take_along_axis(logq, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
    pad = jnp.zeros((tokens.shape[0], 1), jnp.float32)
    return jnp.concatenate([pad, lp], 1), jnp.concatenate([pad, ent], 1)


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.PRNGKey(0), std=0.3)  # large std: peaked, non-uniform distributions
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    mask = np.zeros((B, T), bool)
    for b, n in enumerate([16, 11, 5]):
        mask[b, :n] = True
    weights = rng.randn(2, B, T).astype(np.float32) * mask  # random cotangents, 0 on padding
    return params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(weights)


@pytest.mark.parametrize("chunk", [5, 16, 64])  # 5 does not divide T - 1 = 15; 64 > T
def test_chunked_values_match_naive(setup, chunk):
    params, tokens, mask, _ = setup
    lp, ent = jax.jit(lambda p: token_logprobs(p, CFG, tokens, mask, temperature=TEMP, chunk_size=chunk,
                                               return_entropy=True))(params)
    lp_ref, ent_ref = _naive(params, CFG, tokens, mask, TEMP)
    assert lp.shape == ent.shape == (B, T)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_ref), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(lp)[:, 0] == 0) and np.all(np.asarray(lp)[:, 1:] < 0)
    # the temperature matters: at tau = 1 the values differ
    lp1, _ = token_logprobs(params, CFG, tokens, mask, temperature=1.0, chunk_size=chunk)
    assert np.abs(np.asarray(lp1) - np.asarray(lp))[np.asarray(mask)][1:].max() > 1e-3


def test_chunked_gradients_match_naive(setup):
    """must-show 2: d/dparams of sum(w1 logp + w2 entropy) is the same for chunked and naive."""
    params, tokens, mask, w = setup

    def chunked(p):
        lp, ent = token_logprobs(p, CFG, tokens, mask, temperature=TEMP, chunk_size=4, return_entropy=True)
        return jnp.sum(w[0] * lp) + jnp.sum(w[1] * ent)

    def naive(p):
        lp, ent = _naive(p, CFG, tokens, mask, TEMP)
        return jnp.sum(w[0] * lp) + jnp.sum(w[1] * ent)

    g = jax.jit(jax.grad(chunked))(params)
    g_ref = jax.jit(jax.grad(naive))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g_ref), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(b).max() > 0, path
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=str(path))


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _shapes(sub)
    return out


def test_backward_never_builds_full_logits(setup):
    """No intermediate of the forward or backward holds more than one chunk of [.., V] logits."""
    params, tokens, mask, w = setup
    chunk = 4

    def f(p):
        lp, ent = token_logprobs(p, CFG, tokens, mask, temperature=TEMP, chunk_size=chunk, return_entropy=True)
        return jnp.sum(w[0] * lp) + jnp.sum(w[1] * ent)

    shapes = _shapes(jax.make_jaxpr(jax.grad(f))(params).jaxpr)
    vocab_rows = [int(np.prod(s[:-1])) for s in shapes if len(s) >= 2 and s[-1] == CFG.vocab_size]
    # [B, chunk, V] chunk logits, and the [D, V] lm_head weight / its gradient; nothing bigger
    assert set(vocab_rows) == {B * chunk, CFG.hidden_size}, sorted(set(vocab_rows))
    naive_shapes = _shapes(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(_naive(p, CFG, tokens, mask, TEMP)[0])))(
        params).jaxpr)
    assert (B, T, CFG.vocab_size) in naive_shapes  # the check would see a full logits array


def test_bad_input():
    h = jnp.zeros((2, 4, CFG.hidden_size))
    params = init_params(CFG, jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_from_hidden(params, CFG, h, jnp.zeros((2, 4), jnp.int32), chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs_from_hidden(params, CFG, h, jnp.zeros((2, 5), jnp.int32))
