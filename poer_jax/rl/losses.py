"""Clipped policy-gradient losses (paper Eq. 5-7, GRPO / DAPO / Dr. GRPO) as (sum, denominator) pairs.

Per completion token t of sequence b (paper Eq. 5, 6 with DAPO clip-higher and optional dual clip):

    r      = exp(logp - old_logp)                                       (importance ratio, Eq. 6)
    obj    = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)              (Eq. 5)
    obj    = max(obj, c A)                        if A < 0 and dual_clip c is set
    kl     = exp(ref - logp) - (ref - logp) - 1                          (k3 estimator of KL(pi || ref))
    loss_t = -obj + beta kl

Aggregation (``LossConfig.aggregation``), each returned as a (sum, denominator) pair so that splitting the
batch into micro-batches and adding the sums and the denominators separately is exact:

    "seq_mean_token_mean" (GRPO, Eq. 5): sum_b (sum_t loss / n_b)  /  #{b : n_b > 0}
    "token_mean"          (DAPO):        sum_{b,t} loss            /  sum_b n_b
    "dr_grpo":                           sum_{b,t} loss            /  (B * max_completion_len)

(n_b = trained tokens of row b). TRL's "grpo" also counts rows without any trained token in the
denominator; here such rows (padding rows) are left out. For gradient accumulation take
grad(loss_sum) per micro-batch, add them, and divide by the sum of ``loss_denom`` (the denominators do
not depend on the parameters). ``accumulate`` and ``finalize`` do the same for the values and metrics.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters (frozen and hashable, so it can be a static jit argument).

    objective: registered per-token objective ("ppo_clip" Eq. 5; "vanilla_pg" the authors' code).
    epsilon_low, epsilon_high: clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: 0.2, 0.28).
    dual_clip: c > 1 bounds the loss of negative-advantage tokens at -c A (None: off).
    beta: KL (k3) coefficient; 0 means no reference log-probs are needed.
    aggregation: one of AGGREGATIONS.
    max_completion_len: the constant of "dr_grpo" (required there).
    """

    objective: str = "ppo_clip"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.0
    aggregation: str = "seq_mean_token_mean"
    max_completion_len: int | None = None

    def __post_init__(self) -> None:
        if self.objective not in _OBJECTIVES:
            raise ValueError(
                f"losses.py: objective must be one of {sorted(_OBJECTIVES)}, got {self.objective!r}"
            )
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"losses.py: epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high < 0.0:
            raise ValueError(f"losses.py: epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"losses.py: dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.beta < 0.0:
            raise ValueError(f"losses.py: beta must be >= 0, got {self.beta}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"losses.py: aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.aggregation == "dr_grpo" and (self.max_completion_len is None or self.max_completion_len < 1):
            raise ValueError(
                f"losses.py: aggregation 'dr_grpo' needs max_completion_len >= 1, "
                f"got {self.max_completion_len}"
            )


class LossTerms(NamedTuple):
    """Accumulable loss pieces (a pytree: a NamedTuple of arrays and dicts of arrays).

    Combine micro-batches with ``accumulate``: sums and denominators add, ``metrics_max`` take the
    maximum, ``metrics_min`` the minimum, ``num_tokens`` adds. Then ``finalize`` divides.
    """

    loss_sum: jax.Array
    loss_denom: jax.Array
    metrics_sums: dict[str, jax.Array]
    metrics_denoms: dict[str, jax.Array]
    metrics_max: dict[str, jax.Array]
    metrics_min: dict[str, jax.Array]
    num_tokens: jax.Array


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (0 / 0 -> 0, never NaN)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def accumulate(a: LossTerms, b: LossTerms) -> LossTerms:
    """Combine the terms of two disjoint micro-batches into those of their union."""
    add = functools.partial(jax.tree.map, jnp.add)
    return LossTerms(
        loss_sum=a.loss_sum + b.loss_sum,
        loss_denom=a.loss_denom + b.loss_denom,
        metrics_sums=add(a.metrics_sums, b.metrics_sums),
        metrics_denoms=add(a.metrics_denoms, b.metrics_denoms),
        metrics_max=jax.tree.map(jnp.maximum, a.metrics_max, b.metrics_max),
        metrics_min=jax.tree.map(jnp.minimum, a.metrics_min, b.metrics_min),
        num_tokens=a.num_tokens + b.num_tokens,
    )


def finalize(terms: LossTerms) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics): loss = loss_sum / loss_denom and each metric sum / denom, 0 where denom is 0.

    Max / min metrics are reported as 0 when no token was trained (their identities are -inf / +inf).
    """
    metrics = {k: _safe_div(v, terms.metrics_denoms[k]) for k, v in terms.metrics_sums.items()}
    has_tokens = terms.num_tokens > 0
    for extreme in (terms.metrics_max, terms.metrics_min):
        metrics.update({k: jnp.where(has_tokens, v, 0) for k, v in extreme.items()})
    return _safe_div(terms.loss_sum, terms.loss_denom), metrics


# --- per-token objectives -------------------------------------------------------------------------------

# (logp, old_logp, advantages [B, 1], cfg) -> (objective [B, T] to maximise, {metric: bool flags [B, T]}).
ObjectiveFn = Callable[[jax.Array, jax.Array, jax.Array, LossConfig], tuple[jax.Array, dict[str, jax.Array]]]
_OBJECTIVES: dict[str, ObjectiveFn] = {}


def register_objective(name: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator: make a per-token objective selectable as ``LossConfig(objective=name)``."""

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        if name in _OBJECTIVES:
            raise ValueError(f"losses.py: objective {name!r} is already registered")
        _OBJECTIVES[name] = fn
        return fn

    return deco


@register_objective("ppo_clip")
def ppo_clip_objective(
    logp: jax.Array, old_logp: jax.Array, adv: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), then max(., c A) for A < 0 with dual clip c (Eq. 5)."""
    ratio = jnp.exp(logp - old_logp)
    obj = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high) * adv)
    low = (ratio < 1.0 - cfg.epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.epsilon_high) & (adv > 0)
    flags = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    if cfg.dual_clip is not None:
        floor = cfg.dual_clip * adv
        dual = (adv < 0) & (obj < floor)
        obj = jnp.where(dual, floor, obj)
        flags["clip_ratio/dual_mean"] = dual
    return obj, flags


@register_objective("vanilla_pg")
def vanilla_pg_objective(
    logp: jax.Array, old_logp: jax.Array, adv: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """exp(logp - stop_grad(logp)) A: value A, gradient A grad(logp); no ratio, no clip (authors' code)."""
    del old_logp, cfg
    return jnp.exp(logp - jax.lax.stop_gradient(logp)) * adv, {}


def get_objective(name: str) -> ObjectiveFn:
    if name not in _OBJECTIVES:
        raise ValueError(f"losses.py: unknown objective {name!r}; registered: {sorted(_OBJECTIVES)}")
    return _OBJECTIVES[name]


# --- the loss --------------------------------------------------------------------------------------------


def _check_shape(name: str, x: jax.Array | None, shape: tuple[int, ...]) -> None:
    if x is not None and jnp.shape(x) != shape:
        raise ValueError(f"losses.py: {name} has shape {jnp.shape(x)}, expected {shape}")


def compute_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: LossConfig,
    *,
    entropy: jax.Array | None = None,
) -> LossTerms:
    """Per-token clipped policy loss with KL, aggregated as a (sum, denominator) pair (Eq. 5-7).

    Args:
      logp: [B, T] log-probs of the sampled tokens under the current policy (the only differentiated input).
      old_logp: [B, T] under the sampling policy; None means on-policy (old = stop_grad(logp), ratio 1).
      ref_logp: [B, T] under the reference policy, or None (then beta must be 0).
      advantages: [B], one per sequence (Eq. 6).
      mask: [B, T] bool/0-1, the completion tokens that are trained (see ``completion_mask``).
      cfg: LossConfig.
      entropy: optional [B, T] per-token entropy, only reported as a metric.

    Values at masked-out positions are never used (they may be inf or NaN, e.g. padding), in the value or
    the gradient. Metrics (token means over trained tokens): clip_ratio/{low,high,region}_mean (TRL's),
    clip_ratio/dual_mean with dual clip, kl (when ref_logp is given, even with beta 0), entropy,
    ratio/mean, and ratio/max, ratio/min as max / min reductions.
    """
    if logp.ndim != 2:
        raise ValueError(f"losses.py: logp must be [B, T], got shape {logp.shape}")
    shape = logp.shape
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("entropy", entropy)):
        _check_shape(name, x, shape)
    _check_shape("advantages", advantages, shape[:1])
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"losses.py: beta={cfg.beta} > 0 needs ref_logp")

    dtype = jnp.promote_types(logp.dtype, jnp.float32)
    m = jnp.asarray(mask).astype(bool)
    sg = jax.lax.stop_gradient

    def clean(x: jax.Array) -> jax.Array:
        # Zero masked positions *before* any arithmetic: a where() after exp() would still send NaN
        # gradients back through garbage padding values.
        return jnp.where(m, x.astype(dtype), 0.0)

    lp = clean(logp)
    old = sg(lp) if old_logp is None else sg(clean(old_logp))
    adv = sg(jnp.asarray(advantages).astype(dtype))[:, None]

    obj, flags = get_objective(cfg.objective)(lp, old, adv, cfg)
    per_token = -obj
    kl = None
    if ref_logp is not None:
        diff = sg(clean(ref_logp)) - lp
        kl = jnp.exp(diff) - diff - 1.0
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl
    per_token = jnp.where(m, per_token, 0.0)

    row_tokens = jnp.sum(m, axis=1).astype(dtype)
    num_tokens = jnp.sum(row_tokens)
    if cfg.aggregation == "token_mean":
        loss_sum, loss_denom = jnp.sum(per_token), num_tokens
    elif cfg.aggregation == "seq_mean_token_mean":
        loss_sum = jnp.sum(jnp.sum(per_token, axis=1) / jnp.maximum(row_tokens, 1.0))
        loss_denom = jnp.sum(row_tokens > 0).astype(dtype)
    else:  # dr_grpo; validated by LossConfig
        loss_sum = jnp.sum(per_token)
        loss_denom = jnp.asarray(shape[0] * cfg.max_completion_len, dtype)

    def tok_sum(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(m, sg(x).astype(dtype), 0.0))

    ratio = sg(jnp.exp(lp - old))
    sums = {k: tok_sum(v) for k, v in flags.items()}
    sums["ratio/mean"] = tok_sum(ratio)
    if kl is not None:
        sums["kl"] = tok_sum(kl)
    if entropy is not None:
        sums["entropy"] = tok_sum(entropy)
    return LossTerms(
        loss_sum=loss_sum,
        loss_denom=loss_denom,
        metrics_sums=sums,
        metrics_denoms={k: num_tokens for k in sums},
        metrics_max={"ratio/max": jnp.max(jnp.where(m, ratio, -jnp.inf))},
        metrics_min={"ratio/min": jnp.min(jnp.where(m, ratio, jnp.inf))},
        num_tokens=num_tokens,
    )


def completion_mask(start: jax.Array, end: jax.Array, seq_len: int) -> jax.Array:
    """Bool [B, seq_len]: mask[b, t] = start[b] <= t < end[b] (the trained span of each row).

    For rows laid out as [prompt | prefix | continuation | pad], start is the first continuation token
    (or the first prefix token to train the reused prefix too) and end is one past the last kept token
    (including EOS). Empty where end <= start.
    """
    start, end = jnp.asarray(start), jnp.asarray(end)
    if start.ndim != 1 or start.shape != end.shape:
        raise ValueError(f"losses.py: start and end must both be [B], got {start.shape} and {end.shape}")
    t = jnp.arange(seq_len)[None, :]
    return (t >= start[:, None]) & (t < end[:, None])


# --- named presets ---------------------------------------------------------------------------------------

LOSS_PRESETS: dict[str, dict[str, Any]] = {
    # Eq. 5 (= GRPO): symmetric clip, seq-mean-token-mean, KL with beta 0.04 (open-rs / authors' code).
    "grpo": {"epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.04, "aggregation": "seq_mean_token_mean"},
    "poer": {"epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.04, "aggregation": "seq_mean_token_mean"},
    # DAPO (verl recipe): clip-higher, token-mean, no KL.
    "dapo": {"epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.0, "aggregation": "token_mean"},
    # Dr. GRPO: constant normaliser; pass max_completion_len.
    "dr_grpo": {"epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.0, "aggregation": "dr_grpo"},
    # The POER authors' code: no ratio / clip, KL 0.04, seq-mean-token-mean.
    "poer_code": {"objective": "vanilla_pg", "beta": 0.04, "aggregation": "seq_mean_token_mean"},
}


def get_loss_config(name: str, **overrides: Any) -> LossConfig:
    """LossConfig of preset ``name`` with ``overrides`` (e.g. max_completion_len=4096 for "dr_grpo")."""
    if name not in LOSS_PRESETS:
        raise ValueError(f"losses.py: unknown loss preset {name!r}; known: {sorted(LOSS_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"losses.py: unknown LossConfig fields {sorted(unknown)}; known: {sorted(fields)}")
    return LossConfig(**{**LOSS_PRESETS[name], **overrides})


def get_loss_fn(name: str, **overrides: Any) -> Callable[..., LossTerms]:
    """``compute_loss`` with the preset's config bound: fn(logp, old_logp, ref_logp, advantages, mask,
    entropy=None) -> LossTerms. Jit it directly; the config is a Python constant."""
    return functools.partial(compute_loss, cfg=get_loss_config(name, **overrides))
