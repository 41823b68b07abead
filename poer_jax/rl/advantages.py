"""Group-relative advantages (paper Eq. 6).

    A_i = (R_i - mean_g(R)) / (std(R) + eps)

with the group mean over the G responses of one question and the standard deviation taken per group
("group", Eq. 6 / GRPO), over the whole batch ("batch", TRL ``scale_rewards="batch"``) or not at all
("none", Dr. GRPO). ``eps = 1e-4`` and the unbiased standard deviation (``ddof = 1``, what TRL's
``torch.std`` computes) are the defaults, so advantages match TRL's to rounding.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

ScaleMode = Literal["group", "batch", "none"]
SCALE_MODES: tuple[str, ...] = ("group", "batch", "none")

# TRL's GRPOTrainer divides by (std + 1e-4).
DEFAULT_EPS = 1e-4


def _as_groups(x: jax.Array, group_size: int | None, name: str) -> jax.Array:
    """Reshape ``x`` ([num_groups * G] or [num_groups, G]) to [num_groups, G]; shapes are static."""
    if x.ndim == 2:
        if group_size is not None and x.shape[1] != group_size:
            raise ValueError(f"advantages.py: {name} has shape {x.shape} but group_size={group_size}")
        return x
    if x.ndim != 1:
        raise ValueError(f"advantages.py: {name} must be [num_groups * G] or [num_groups, G], got {x.shape}")
    if group_size is None or group_size < 1:
        raise ValueError(
            f"advantages.py: flat {name} of shape {x.shape} needs group_size >= 1, got {group_size}"
        )
    if x.shape[0] % group_size:
        raise ValueError(
            f"advantages.py: {name} has {x.shape[0]} entries, not a multiple of group_size={group_size}"
        )
    return x.reshape(-1, group_size)


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_std(centered: jax.Array, count: jax.Array, ddof: int, axis: tuple[int, ...] | None) -> jax.Array:
    """sqrt(sum(centered^2) / (count - ddof)), defined as 0 where count - ddof <= 0 (e.g. G = 1)."""
    sq = jnp.sum(centered * centered, axis=axis)
    dof = count - ddof
    return jnp.where(dof > 0, jnp.sqrt(sq / jnp.maximum(dof, 1)), 0.0)


def group_mean_std(
    rewards: jax.Array,
    group_size: int | None = None,
    *,
    ddof: int = 1,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-group mean and standard deviation, each [num_groups].

    mean_g = sum_i v_i R_i / n_g,  std_g = sqrt(sum_i v_i (R_i - mean_g)^2 / (n_g - ddof)),
    n_g = sum_i v_i (v = ``valid``, all ones if None). A group with n_g - ddof <= 0 has std 0 (not NaN);
    an empty group has mean 0.
    """
    r = _as_groups(_float(rewards), group_size, "rewards")
    v = (
        jnp.ones(r.shape, bool)
        if valid is None
        else _as_groups(jnp.asarray(valid, bool), group_size, "valid")
    )
    if v.shape != r.shape:
        raise ValueError(f"advantages.py: valid has shape {v.shape}, rewards {r.shape}")
    n = jnp.sum(v, axis=1).astype(r.dtype)
    mean = jnp.sum(jnp.where(v, r, 0.0), axis=1) / jnp.maximum(n, 1)
    centered = jnp.where(v, r - mean[:, None], 0.0)
    return mean, _masked_std(centered, n, ddof, axis=(1,))


def group_advantages(
    rewards: jax.Array,
    group_size: int | None = None,
    *,
    scale: ScaleMode = "group",
    eps: float = DEFAULT_EPS,
    ddof: int = 1,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Group-relative advantages, paper Eq. 6 (GRPO), returned in the shape of ``rewards``.

        A_i = (R_i - mean_g) / (s + eps)       scale="group": s = std_g   (std of R_i's own group)
                                              scale="batch": s = std of all valid rewards of the batch
                                                             (around the batch mean, as TRL)
        A_i =  R_i - mean_g                    scale="none"  (Dr. GRPO)

    Args:
      rewards: [num_groups * G] (group-major, needs ``group_size``) or [num_groups, G].
      group_size: G, required for flat input.
      scale: "group" | "batch" | "none".
      eps: added to the standard deviation (TRL: 1e-4). Groups whose rewards are all equal get A = 0.
      ddof: delta degrees of freedom of the std; 1 (unbiased, TRL/torch default) or 0 (population).
        With ddof=1 a group of one response (G = 1) has std 0 and advantage 0, never NaN.
      valid: optional bool mask like ``rewards``; invalid (padding) entries are left out of the means
        and standard deviations and get advantage 0.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"advantages.py: scale must be one of {SCALE_MODES}, got {scale!r}")
    if ddof not in (0, 1):
        raise ValueError(f"advantages.py: ddof must be 0 or 1, got {ddof}")
    if eps < 0:
        raise ValueError(f"advantages.py: eps must be >= 0, got {eps}")
    shape = jnp.shape(rewards)
    r = _as_groups(_float(rewards), group_size, "rewards")
    v = (
        jnp.ones(r.shape, bool)
        if valid is None
        else _as_groups(jnp.asarray(valid, bool), group_size, "valid")
    )
    if v.shape != r.shape:
        raise ValueError(f"advantages.py: valid has shape {v.shape}, rewards {r.shape}")
    mean, group_std = group_mean_std(r, ddof=ddof, valid=v)
    centered = jnp.where(v, r - mean[:, None], 0.0)
    if scale == "none":
        adv = centered
    else:
        if scale == "group":
            std = group_std[:, None]
        else:
            n_all = jnp.sum(v).astype(r.dtype)
            batch_mean = jnp.sum(jnp.where(v, r, 0.0)) / jnp.maximum(n_all, 1)
            std = _masked_std(jnp.where(v, r - batch_mean, 0.0), n_all, ddof, axis=None)
        # A group with equal rewards has centered == 0 exactly, so 0 / (0 + eps) = 0; with eps = 0 guard
        # the division so such groups still give 0 rather than NaN.
        denom = std + eps
        adv = jnp.where(denom > 0, centered / jnp.where(denom > 0, denom, 1.0), 0.0)
    return adv.reshape(shape)
