"""Length-aware reward shaping (paper Sec. 3.4, Eq. 10).

    R(s_i) = clip( r(s_i) / (1 + exp(-alpha (l_ref - len(o_i)))), m, M )
           = clip( r(s_i) * sigmoid(alpha (l_ref - len(o_i))), m, M )

with l_ref the mean response length of the group. Lengths are counted in tokens (the authors' code
counts whitespace-separated words; the paper does not say).

Two variants (see /work/shared/reference/poer-reference-code.md):

* ``"paper"`` (default, the literal Eq. 10): every response is shaped and l_ref is the mean length of all
  G responses. Taken literally an incorrect answer (r = 0) is clipped up to m = 0.5, and so is any
  correct answer at or above the mean length (sigmoid <= 1/2), so such answers are indistinguishable.
* ``"correct_only"`` (the authors' code): only correct responses (r > 0 unless ``correct`` is given) are
  shaped, l_ref is the mean length over the correct responses of the group, and incorrect responses keep
  their raw reward. The code also used alpha = 0.1 with word counts; pass ``alpha`` to reproduce that.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

LengthRewardVariant = Literal["paper", "correct_only"]
LENGTH_REWARD_VARIANTS: tuple[str, ...] = ("paper", "correct_only")


def length_aware_reward(
    rewards: jax.Array,
    lengths: jax.Array,
    *,
    alpha: float = 0.01,
    r_min: float = 0.5,
    r_max: float = 1.0,
    variant: LengthRewardVariant = "paper",
    correct: jax.Array | None = None,
) -> jax.Array:
    """Shape rewards by response length, paper Eq. 10; returns [num_groups, G].

        R_i = clip(r_i * sigmoid(alpha * (l_ref - len_i)), r_min, r_max)

    Args:
      rewards: original rewards r, [num_groups, G].
      lengths: response lengths in tokens, [num_groups, G].
      alpha: length sensitivity (paper: 0.01).
      r_min, r_max: clip bounds m and M (paper: 0.5 and 1.0).
      variant: "paper": all responses shaped, l_ref = mean over the group's G lengths.
        "correct_only": only ``correct`` responses shaped, l_ref = mean length over the group's correct
        responses; the others keep r unchanged.
      correct: bool [num_groups, G] for "correct_only"; defaults to ``rewards > 0``.
    """
    if variant not in LENGTH_REWARD_VARIANTS:
        raise ValueError(
            f"length_reward.py: variant must be one of {LENGTH_REWARD_VARIANTS}, got {variant!r}"
        )
    if alpha <= 0:
        raise ValueError(f"length_reward.py: alpha must be > 0, got {alpha}")
    if r_min > r_max:
        raise ValueError(f"length_reward.py: r_min={r_min} > r_max={r_max}")
    r = jnp.asarray(rewards)
    r = r.astype(jnp.promote_types(r.dtype, jnp.float32))
    length = jnp.asarray(lengths).astype(r.dtype)
    if r.ndim != 2 or length.shape != r.shape:
        raise ValueError(
            f"length_reward.py: rewards and lengths must both be [num_groups, G], got {r.shape} "
            f"and {length.shape}"
        )
    if variant == "paper":
        l_ref = jnp.mean(length, axis=1, keepdims=True)
        # sigmoid is exp-overflow safe for large length gaps, unlike the literal 1 / (1 + exp(.)).
        return jnp.clip(r * jax.nn.sigmoid(alpha * (l_ref - length)), r_min, r_max)
    is_correct = r > 0 if correct is None else jnp.asarray(correct, bool)
    if is_correct.shape != r.shape:
        raise ValueError(f"length_reward.py: correct has shape {is_correct.shape}, rewards {r.shape}")
    n_correct = jnp.sum(is_correct, axis=1, keepdims=True).astype(r.dtype)
    # Groups with no correct answer shape nothing, so their l_ref value is irrelevant; avoid 0 / 0.
    l_ref = jnp.sum(jnp.where(is_correct, length, 0.0), axis=1, keepdims=True) / jnp.maximum(n_correct, 1)
    shaped = jnp.clip(r * jax.nn.sigmoid(alpha * (l_ref - length)), r_min, r_max)
    return jnp.where(is_correct, shaped, r)
