"""Per-token log-probabilities (and entropies) from final hidden states, chunked over the sequence.

For row b and token t >= 1, with logits z = h[b, t-1] W / tau (W the lm_head, tau the sampling temperature
applied as logits / temperature, the TRL convention):

    logp[b, t]    = z[tokens[b, t]] - logsumexp(z)                 (log pi_theta(o_t | q, o_<t), Eq. 5-6)
    entropy[b, t] = logsumexp(z) - sum_v softmax(z)_v z_v          (entropy of the distribution of token t)

and logp[b, 0] = entropy[b, 0] = 0 (nothing predicts the first token). The [B, T, V] logits are never
materialised: the sequence is cut into chunks of ``chunk_size`` positions and a scan computes one chunk's
[B, chunk, V] logits at a time. The chunk body is wrapped in ``jax.checkpoint``, so the backward pass
recomputes each chunk's logits instead of keeping all of them (peak memory O(B * chunk * V), not
O(B * T * V)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import Params, forward, lm_head_weight, positions_from_mask


def _chunk_stats(
    w: jax.Array, h: jax.Array, targets: jax.Array, temperature: float | jax.Array, compute_dtype: jnp.dtype,
    with_entropy: bool,
) -> tuple[jax.Array, jax.Array]:
    """h [B, c, D], targets [B, c] -> (log-prob of each target, entropy) at each position, float32 [B, c]."""
    z = jnp.einsum("bcd,dv->bcv", h.astype(compute_dtype), w.astype(compute_dtype),
                   preferred_element_type=jnp.float32) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    if not with_entropy:
        return picked - logz, jnp.zeros_like(logz)
    ent = logz - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
    return picked - logz, ent


def token_logprobs_from_hidden(
    params: Params,
    cfg: QwenConfig,
    hidden: jax.Array,
    tokens: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 512,
    return_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """(logp [B, T], entropy [B, T] or None) of ``tokens`` given ``hidden`` = forward(...) [B, T, D].

    Position t's value is about token t (predicted from hidden[:, t-1]); position 0 holds 0. ``chunk_size``
    need not divide T (the last chunk is padded). Values at padding positions are finite but meaningless.
    """
    if hidden.ndim != 3 or tokens.shape != hidden.shape[:2]:
        raise ValueError(f"logprobs.py: hidden {hidden.shape} and tokens {tokens.shape} must be [B, T, D], [B, T]")
    if chunk_size < 1:
        raise ValueError(f"logprobs.py: chunk_size must be >= 1, got {chunk_size}")
    B, T, D = hidden.shape
    # hidden[:, t] predicts tokens[:, t + 1]: drop the last position (it predicts nothing in the row).
    h = hidden[:, :-1]
    targets = tokens[:, 1:].astype(jnp.int32)
    n = T - 1
    c = min(chunk_size, max(n, 1))
    num_chunks = -(-n // c)
    pad = num_chunks * c - n
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [num_chunks, B, c, ...]: the scan walks the sequence axis.
    h = h.reshape(B, num_chunks, c, D).swapaxes(0, 1)
    targets = targets.reshape(B, num_chunks, c).swapaxes(0, 1)
    w = lm_head_weight(params, cfg)

    @jax.checkpoint
    def body(h_c: jax.Array, t_c: jax.Array) -> tuple[jax.Array, jax.Array]:
        return _chunk_stats(w, h_c, t_c, temperature, cfg.jnp_dtype, return_entropy)

    _, (lp, ent) = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, (h, targets))
    zero = jnp.zeros((B, 1), jnp.float32)

    def unchunk(x: jax.Array) -> jax.Array:
        return jnp.concatenate([zero, x.swapaxes(0, 1).reshape(B, num_chunks * c)[:, :n]], axis=1)

    return unchunk(lp), (unchunk(ent) if return_entropy else None)


def token_logprobs(
    params: Params,
    cfg: QwenConfig,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    chunk_size: int = 512,
    return_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Decoder forward over a padded batch (positions from the mask), then ``token_logprobs_from_hidden``."""
    mask = attention_mask.astype(bool)
    hidden = forward(params, cfg, tokens, positions_from_mask(mask), mask)
    return token_logprobs_from_hidden(
        params, cfg, hidden, tokens, temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy
    )
