"""DAPO overlong reward shaping (soft overlong punishment, as in verl's DAPO recipe).

    expected = max_len - buffer_len
    penalty  = min(-(len - expected) / buffer_len, 0) * penalty_factor
    R'       = R + penalty

The penalty is 0 up to ``max_len - buffer_len`` tokens and falls linearly to ``-penalty_factor`` at
``max_len``. Like verl it is not floored: a length above ``max_len`` (impossible when generation stops at
``max_len``) is penalised further. Lengths are in tokens (Tunix measured characters, a bug to avoid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(max_len: int, buffer_len: int, penalty_factor: float) -> None:
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(
            f"reward_shaping.py: need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, "
            f"max_len={max_len}"
        )
    if penalty_factor < 0:
        raise ValueError(f"reward_shaping.py: penalty_factor must be >= 0, got {penalty_factor}")


def overlong_penalty(
    lengths: jax.Array, *, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> jax.Array:
    """Per-response penalty min(-(len - (max_len - buffer_len)) / buffer_len, 0) * penalty_factor (<= 0)."""
    _check(max_len, buffer_len, penalty_factor)
    length = jnp.asarray(lengths)
    length = length.astype(jnp.promote_types(length.dtype, jnp.float32))
    expected = max_len - buffer_len
    return jnp.minimum(-(length - expected) / buffer_len, 0.0) * penalty_factor


def apply_overlong_penalty(
    rewards: jax.Array,
    lengths: jax.Array,
    *,
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> jax.Array:
    """R + overlong_penalty(len); ``rewards`` and ``lengths`` have the same shape."""
    r = jnp.asarray(rewards)
    if jnp.shape(lengths) != r.shape:
        raise ValueError(
            f"reward_shaping.py: rewards {r.shape} and lengths {jnp.shape(lengths)} must have the same shape"
        )
    pen = overlong_penalty(lengths, max_len=max_len, buffer_len=buffer_len, penalty_factor=penalty_factor)
    return r.astype(jnp.promote_types(r.dtype, pen.dtype)) + pen
