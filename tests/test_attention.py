"""Memory-efficient attention paths against the dense reference, with left and right padding, values and
gradients at real tokens; the model's dispatch; the choice of ``auto`` per platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poer_jax.model import attention as A
from poer_jax.model import init_params, preset
from poer_jax.model.config import ModelConfigError
from poer_jax.model.qwen import forward, positions_from_mask


def _inputs(T: int, hd: int, seed: int = 0):
    B, Hq, Hkv = 3, 4, 2
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, Hq, hd))
    k = jax.random.normal(ks[1], (B, T, Hkv, hd))
    v = jax.random.normal(ks[2], (B, T, Hkv, hd))
    mask = np.zeros((B, T), bool)
    mask[0, : T - 7] = True  # right padding
    mask[1, 5:] = True  # left padding
    mask[2, 3: T - 4] = True  # both
    return q, k, v, jnp.asarray(mask)


def _check(fn, T: int, hd: int, tol: float = 1e-5) -> None:
    q, k, v, mask = _inputs(T, hd)
    real = mask[:, :, None, None]

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.where(real, f(q, k, v), 0.0) ** 2)

    def dense(q, k, v):
        return A.dense_attention(q, k, v, A.causal_mask(mask))

    def path(q, k, v):
        return fn(q, k, v, mask)

    out, ref = jax.jit(path)(q, k, v), jax.jit(dense)(q, k, v)
    assert bool(jnp.all(jnp.isfinite(out)))  # padding rows too: no empty softmax
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=tol, rtol=tol)
    g = jax.jit(jax.grad(loss(path), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=20 * tol, rtol=20 * tol)


def test_dense_matches_a_numpy_reference() -> None:
    """The reference itself, per row, KV head and query head (GQA: query head h reads KV head h // 2), with fewer
    queries than keys (the chunked path's blocks) and padding on either side."""
    q, k, v, mask = _inputs(12, 8, seed=3)
    q = q[:, 4:]  # queries 4..11 against keys 0..11
    allowed = np.asarray(A.causal_mask(mask))[:, 4:]
    out = np.asarray(jax.jit(A.dense_attention)(q, k, v, jnp.asarray(allowed)))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Tq, Hq, hd = qn.shape
    for b in range(B):
        for h in range(Hq):
            s = qn[b, :, h] @ kn[b, :, h // 2].T / np.sqrt(hd)
            s = np.where(allowed[b], s, -np.inf)
            for i in range(Tq):
                if allowed[b, i].any():  # a query with no allowed key (padding) is meaningless
                    p = np.exp(s[i] - s[i].max())
                    np.testing.assert_allclose(out[b, i, h], p @ vn[b, :, h // 2] / p.sum(), atol=1e-5)


@pytest.mark.parametrize("T", [20, 8])  # 3 blocks, the last one short; one block (plain dense)
def test_causal_blocks_match_dense(T: int) -> None:
    _check(lambda q, k, v, m: A.causal_blocks(q, k, v, m, block=8), T=T, hd=16)


def test_chunked_matches_dense() -> None:
    _check(lambda q, k, v, m: A.chunked_attention(q, k, v, m, block=8), T=20, hd=16)  # 3 blocks, the last padded


def test_cudnn_call_matches_dense() -> None:
    # the same jax.nn.dot_product_attention call as on GPU (row rotation, sequence lengths), run through XLA
    _check(lambda q, k, v, m: A.cudnn_attention(q, k, v, m, implementation="xla"), T=20, hd=16)


def test_cudnn_call_per_shard_matches_dense_on_a_mesh() -> None:
    """On a mesh the cuDNN call runs per shard (batch over data / fsdp, heads over tensor), as splash does: its own
    partitioning rule fails under the sampler's partly manual shard_map. Run through XLA on 8 CPU devices."""
    from poer_jax.model.sharding import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": 3, "tensor": 2}, jax.devices()[:6])  # 3 rows, 4 / 2 heads: both divide
    local = lambda q, k, v, m: A.cudnn_attention(q, k, v, m, implementation="xla")  # noqa: E731
    with jax.set_mesh(mesh):
        _check(lambda q, k, v, m: A._per_shard(local, q, k, v, m), T=20, hd=16)
        text = jax.jit(lambda q, k, v, m: A._per_shard(local, q, k, v, m)).lower(*_inputs(20, 16)).as_text()
    assert "shard_map" in text or "manual" in text


def test_splash_matches_dense_in_interpret_mode() -> None:
    # the Pallas TPU kernel in interpret mode; T = 20 is padded to one 128-token tile
    _check(lambda q, k, v, m: A.splash_attention(q, k, v, m, interpret=True), T=20, hd=128, tol=2e-5)


def test_forward_dispatches_to_the_configured_attention() -> None:
    cfg = preset("tiny", attention="dense")
    params = init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    mask = jnp.asarray(np.arange(12)[None, :] >= np.array([[0], [4]]))  # row 1 left-padded
    pos = positions_from_mask(mask)
    ref = jax.jit(forward, static_argnums=1)(params, cfg, tokens, pos, mask)
    out = jax.jit(forward, static_argnums=1)(params, cfg.replace(attention="chunked"), tokens, pos, mask)
    np.testing.assert_allclose(np.where(mask[..., None], out, 0), np.where(mask[..., None], ref, 0), atol=1e-5)
    with pytest.raises(ModelConfigError, match="attention"):
        cfg.replace(attention="flash")


def test_auto_picks_by_platform_and_shape() -> None:
    assert A.resolve_attention("auto", "cpu") == "dense"
    assert A.resolve_attention("auto", "tpu", jnp.bfloat16, 128) == "splash"
    assert A.resolve_attention("auto", "tpu", jnp.bfloat16, 64) == "chunked"
    assert A.resolve_attention("auto", "gpu", jnp.bfloat16, 128) == "cudnn"
    assert A.resolve_attention("auto", "gpu", jnp.float32, 128) == "chunked"  # cuDNN flash needs 16-bit inputs
    assert A.resolve_attention("chunked", "tpu") == "chunked"
    with pytest.raises(ValueError, match="unknown implementation"):
        A.resolve_attention("flash")
