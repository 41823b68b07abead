"""Truncated answer sampling: which prefix of the cached answer a rollout continues (paper Sec. 3.2).

Eq. 3:  o = a_k^[0:-m] || pi_theta(. | q_k, a_k^[0:-m]),   m ~ U{0, 1, ..., L}
Eq. 4:  l = min{len(o_1), ..., len(o_G)}

How L is set (``TruncationConfig.limit``):
* ``"fixed"``:   L = max_truncation (the paper's speed study: L = 300, Figure 3 / Table 2);
* ``"dynamic"``: L = floor(fraction * l), l the shortest response of the question's last group (Eq. 4;
  the paper's main experiments, fraction = 0.5, Sec. 4.1); before a question's first update l is the
  length of its cached answer;
* ``"both"``:    the smaller of the two (dynamic, capped at max_truncation).

One m is drawn per group (per question), inclusive of both 0 and L. The group's G continuations then
share the prefix a_k^[0:-m]. Rules beyond the paper, chosen so every prefix is a valid generation state:

* EOS never ends a prefix. With n = len(a_k), the prefix length is
      p = max{ j + 1 : j < n - m, a_k[j] not in eos_ids }  (0 if none),
  which equals min(n - m, n_stripped) where n_stripped is n without the trailing run of EOS tokens: the
  cached answer's final EOS is always removed, also when m = 0.
* p <= max_completion_len - 1, so at least one new token fits in the completion (prefix + continuation).
* A row with no cached answer (n = 0, or an index outside [0, N)) gets p = 0 and the full budget: the
  rollout is then a plain GRPO rollout from the question.

Continuation budget (max new tokens per continuation):
* ``"removed"``  (the authors' max_tokens = m): r = n - p new tokens, the removed count including a
  stripped EOS, but at least 1 — the authors' code can request max_tokens = 0 when m = 0, which we treat
  as "regenerate at least one token" (typically the EOS again). Capped by max_completion_len - p.
* ``"max_length"`` (the paper's 4096-token limit): max_completion_len - p, so prefix + continuation fits.
* ``max_continuation`` (``rollout.max_continuation_len``; None = no cap, the paper): either budget capped at
  this many new tokens. A batched decode runs until its longest continuation stops, so under the paper's
  budget one continuation that does not stop holds the whole rollout; the cap bounds the decode steps.

``mode="authors"`` reproduces the authors' sampling instead: m = randint(1, L), i.e. m in [1, L - 1]
(exclusive upper bound), ONE m shared by the whole batch; only a fixed L is allowed there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from typing import Literal

import jax
import jax.numpy as jnp

from poer_jax.poer.cache_pool import CachePool, fit_width

TruncationMode = Literal["paper", "authors"]
BudgetMode = Literal["removed", "max_length"]
LimitMode = Literal["fixed", "dynamic", "both"]
LIMIT_MODES: tuple[str, ...] = ("fixed", "dynamic", "both")


@dataclasses.dataclass(frozen=True)
class TruncationConfig:
    """Static (hashable) truncation settings; the defaults are the command line's (``cache.*``).

    limit: how L is set, "fixed" (max_truncation), "dynamic" (floor(fraction * l), Eq. 4) or "both"
    (the smaller); each rule reads only its own parameter. floor(fraction * l) is computed in integer
    arithmetic with ``fraction`` as the nearest rational of denominator <= 1000 (0.5 -> 1/2, 0.3 -> 3/10),
    so it never depends on float rounding.
    """

    max_completion_len: int
    limit: LimitMode = "fixed"
    max_truncation: int = 300
    fraction: float = 0.5
    mode: TruncationMode = "paper"
    budget: BudgetMode = "max_length"
    max_continuation: int | None = None

    def __post_init__(self) -> None:
        if self.max_completion_len < 1:
            raise ValueError(f"truncation: max_completion_len must be >= 1, got {self.max_completion_len}")
        if self.limit not in LIMIT_MODES:
            raise ValueError(f"truncation: limit must be one of {LIMIT_MODES}, got {self.limit!r}")
        if self.max_truncation is None or self.max_truncation < 0:
            raise ValueError(f"truncation: max_truncation must be an int >= 0, got {self.max_truncation}")
        if self.fraction is None or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"truncation: fraction must be in [0, 1], got {self.fraction}")
        if self.mode not in ("paper", "authors"):
            raise ValueError(f"truncation: mode must be 'paper' or 'authors', got {self.mode!r}")
        if self.budget not in ("removed", "max_length"):
            raise ValueError(f"truncation: budget must be 'removed' or 'max_length', got {self.budget!r}")
        if self.max_continuation is not None and self.max_continuation < 1:
            raise ValueError(f"truncation: max_continuation must be None or >= 1, got {self.max_continuation}")
        if self.mode == "authors":
            if self.limit != "fixed":
                raise ValueError(f"truncation: mode='authors' uses a fixed L; got limit={self.limit!r}")
            if self.max_truncation < 2:
                raise ValueError("truncation: mode='authors' draws m = randint(1, L) in [1, L-1]; "
                                 f"needs max_truncation >= 2, got {self.max_truncation}")


@dataclasses.dataclass(frozen=True)
class Truncation:
    """Per-group truncation decision; all int32 [B]."""

    prefix_len: jax.Array  # p: tokens of the cached answer kept
    m: jax.Array  # the sampled m of Eq. 3
    budget: jax.Array  # max new tokens for each continuation of the group
    L: jax.Array  # the maximum truncation length used for this group
    removed: jax.Array  # n - p: cached tokens actually dropped (m, plus a stripped EOS, clamped at 0)


jax.tree_util.register_dataclass(Truncation, data_fields=["prefix_len", "m", "budget", "L", "removed"],
                                 meta_fields=[])


def _gather_rows(pool: CachePool, indices: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [B, max_len], lengths [B], shortest_len [B]); an invalid index reads as an empty row."""
    indices = jnp.asarray(indices, jnp.int32)
    valid = (indices >= 0) & (indices < pool.num_questions)
    safe = jnp.where(valid, indices, 0)
    lengths = jnp.where(valid, pool.lengths[safe], 0)
    shortest = jnp.where(valid, pool.shortest_len[safe], 0)
    return pool.tokens[safe], lengths, shortest


def is_eos(tokens: jax.Array, eos_ids: Sequence[int] | jax.Array) -> jax.Array:
    """Boolean mask of tokens in ``eos_ids`` (any number of ids, possibly none)."""
    eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    if eos.shape[0] == 0:
        return jnp.zeros(tokens.shape, jnp.bool_)
    return jnp.any(tokens[..., None] == eos, axis=-1)


def max_truncation_per_group(config: TruncationConfig, shortest_len: jax.Array) -> jax.Array:
    """L per group: fixed, floor(fraction * l) with l from Eq. 4, or the min of both; int32 [B]."""
    fixed = jnp.full(shortest_len.shape, config.max_truncation, jnp.int32)
    if config.limit == "fixed":
        return fixed
    frac = Fraction(config.fraction).limit_denominator(1000)
    big = jnp.maximum(shortest_len, 0).astype(jnp.int32)
    L = (big * frac.numerator) // frac.denominator
    if config.limit == "both":
        L = jnp.minimum(L, fixed)
    return L.astype(jnp.int32)


def truncate(pool: CachePool, indices: jax.Array, key: jax.Array, config: TruncationConfig,
             eos_ids: Sequence[int] | jax.Array) -> Truncation:
    """Sample m per group (Eq. 3, L fixed or from Eq. 4) and derive prefix length and budget.

    ``indices`` [B] are the dataset rows of the B groups. Pure and jittable (``config`` is static).
    In "paper" mode group b's m comes from fold_in(key, indices[b]), so it does not depend on the batch
    layout (a row named twice in one batch gets the same m).
    """
    tokens, n, shortest = _gather_rows(pool, indices)
    batch = n.shape[0]
    if config.mode == "paper":
        L = max_truncation_per_group(config, shortest)
        # U{0..L}, both ends included; one key per question row, so a group's m does not depend on where
        # it sits in the batch (padding, process count, batch size)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(indices).astype(jnp.uint32))
        m = jax.vmap(lambda k, hi: jax.random.randint(k, (), 0, hi + 1, dtype=jnp.int32))(row_keys, L)
    else:
        L = jnp.full((batch,), config.max_truncation, jnp.int32)
        m = jnp.broadcast_to(jax.random.randint(key, (), 1, config.max_truncation, dtype=jnp.int32), (batch,))
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    keepable = (pos < (n - m)[:, None]) & ~is_eos(tokens, eos_ids)
    prefix_len = jnp.max(jnp.where(keepable, pos + 1, 0), axis=1, initial=0)
    prefix_len = jnp.minimum(prefix_len, config.max_completion_len - 1).astype(jnp.int32)
    removed = jnp.maximum(n - prefix_len, 0)
    room = config.max_completion_len - prefix_len
    if config.budget == "removed":
        budget = jnp.minimum(jnp.where(n > 0, jnp.maximum(removed, 1), config.max_completion_len), room)
    else:
        budget = room
    if config.max_continuation is not None:
        budget = jnp.minimum(budget, config.max_continuation)
    return Truncation(prefix_len=prefix_len, m=m, budget=budget.astype(jnp.int32), L=L,
                      removed=removed.astype(jnp.int32))


def prefix_tokens(pool: CachePool, indices: jax.Array, trunc: Truncation,
                  width: int | None = None) -> jax.Array:
    """a_k^[0:-m] per group as int32 [B, width] (default max_len), right-padded with the pool's pad_id."""
    tokens, _, _ = _gather_rows(pool, indices)
    width = pool.max_len if width is None else width
    tokens = fit_width(tokens, width, pool.pad_id)
    pos = jnp.arange(width, dtype=jnp.int32)
    return jnp.where(pos < trunc.prefix_len[:, None], tokens, jnp.asarray(pool.pad_id, jnp.int32))


def join_prefix_continuation(prefix: jax.Array, prefix_len: jax.Array, continuation: jax.Array,
                             continuation_len: jax.Array, pad_id: int,
                             out_len: int) -> tuple[jax.Array, jax.Array]:
    """Full responses o = prefix || continuation (Eq. 3) for the cache update and the reward.

    prefix [B, Tp] (first prefix_len [B] valid), continuation [B, G, Tc] (first continuation_len [B, G]
    valid) -> (tokens int32 [B, G, out_len] right-padded with pad_id, lengths int32 [B, G]); a response
    longer than out_len is cut to out_len.
    """
    p = prefix_len.astype(jnp.int32)[:, None, None]
    c = continuation_len.astype(jnp.int32)[:, :, None]
    pos = jnp.arange(out_len, dtype=jnp.int32)[None, None, :]
    pre = fit_width(prefix.astype(jnp.int32), out_len, pad_id)[:, None, :]
    cont = jnp.take_along_axis(continuation, jnp.clip(pos - p, 0, continuation.shape[2] - 1), axis=2)
    out = jnp.where(pos < p, pre, jnp.where(pos < p + c, cont, jnp.asarray(pad_id, jnp.int32)))
    lengths = jnp.minimum(prefix_len[:, None] + continuation_len, out_len).astype(jnp.int32)
    return out.astype(jnp.int32), lengths


def truncation_metrics(trunc: Truncation) -> dict[str, jax.Array]:
    """Batch means of the truncation decision (device scalars; the caller decides when to fetch)."""
    return {f"cache/trunc_{k}_mean": jnp.mean(getattr(trunc, k).astype(jnp.float32))
            for k in ("m", "L", "prefix_len", "removed", "budget")}
