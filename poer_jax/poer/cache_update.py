"""Cache pool update after a rollout (paper Sec. 3.3, Eq. 9) and cache/* metrics.

Eq. 9, per question q_k with group responses {o_i}_{i=1..G} (full responses: prefix || continuation) and
rewards {R_i}, u ~ U(0, 1):
    C^(t) = C^(t-1) u {(q_k, o_argmax R_i)} \\ {(q_k, a_k)}   if u <= epsilon
    C^(t) = C^(t-1) u {(q_k, o_g')}         \\ {(q_k, a_k)}   otherwise,  g' a random OTHER response

Which response is "best": the correct one first, then the highest R, then the shortest. With ``primary``
[B, G] given (the loop passes the accuracy verdict, or the raw reward r when the run has no accuracy
reward), the candidates are the responses whose primary key is the group's largest; among them the
highest R, and among equal R the shortest response (``best_response``). Eq. 9 takes the argmax of R alone,
but R is the length-shaped reward of Eq. 10, which clips a wrong answer (r = 0) up to m = 0.5 and so
every correct answer at or above the group's mean length: with raw rewards [0, 1, 0, 1, 0, 0] and lengths
[200, 900, 300, 700, 250, 350] all six R are 0.5, and the plain argmax caches the first, wrong, answer.
Ranked this way the "best" is the 700-token correct answer: right whenever the group has a right answer,
and the shortest of them, as Eq. 10 intends. Without ``primary`` the ranking is R, then length.

Modes:
* ``"epsilon_greedy"`` (paper): best with probability epsilon, else g' uniform over the G - 1 responses
  other than the best (for G = 1 the only response). The coin is drawn as u < epsilon, which has the
  paper's probability and is exact at epsilon = 0 (never best) and 1 (always best). Ties go to the first
  maximal response; NaN rewards count as -inf.
* ``"none"``: the "no update" baseline of Table 9: the pool is returned unchanged, including
  ``shortest_len``, so dynamic truncation keeps using len(a_k) of the initial answer.
* ``"authors"``: the authors' code: with probability 0.5 (epsilon is ignored) the best, else
  randint(0, G - 1), i.e. uniform over indices 0..G-2 — the last sample is never picked at random, and
  the random pick may be the best. (As shipped, their update never fires; this mode is what it would do.)

Every updated row also records last_reward = R_chosen and shortest_len = min_i len(o_i) (l of Eq. 4).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from poer_jax.poer.cache_pool import CachePool, fit_width, mask_beyond_length, scatter_rows, write_rows

UpdateMode = Literal["epsilon_greedy", "none", "authors"]
UPDATE_MODES = ("epsilon_greedy", "none", "authors")
AUTHORS_BEST_PROB = 0.5


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    """New pool plus per-group bookkeeping for metrics."""

    pool: CachePool
    chosen: jax.Array  # int32 [B]: response index stored, -1 when the row was not updated
    took_best: jax.Array  # bool [B]: the stored response is the best one (correct first, then highest R)
    updated: jax.Array  # bool [B]: this group's row was written (valid index, not superseded, mode != none)


jax.tree_util.register_dataclass(UpdateResult, data_fields=["pool", "chosen", "took_best", "updated"],
                                 meta_fields=[])


def best_response(rewards: jax.Array, primary: jax.Array | None = None,
                  lengths: jax.Array | None = None) -> jax.Array:
    """The best response of each group, int32 [B], ranked lexicographically: the largest ``primary`` key
    (e.g. correctness) first, then the largest reward, then the shortest ``lengths``, then the first.
    All [B, G]; NaN keys rank lowest."""
    rewards = jnp.asarray(rewards, jnp.float32)
    cand = jnp.ones(rewards.shape, jnp.bool_)
    for key in (primary, rewards):
        if key is None:
            continue
        key = jnp.asarray(key, jnp.float32)
        if key.shape != rewards.shape:
            raise ValueError(f"cache update: a ranking key has shape {key.shape}, rewards {rewards.shape}")
        key = jnp.where(cand & ~jnp.isnan(key), key, -jnp.inf)
        cand = cand & (key == jnp.max(key, axis=1, keepdims=True))
    if lengths is not None:
        key = jnp.where(cand, jnp.asarray(lengths, jnp.int32), jnp.iinfo(jnp.int32).max)
        cand = cand & (key == jnp.min(key, axis=1, keepdims=True))
    return jnp.argmax(cand, axis=1).astype(jnp.int32)


def choose_responses(rewards: jax.Array, key: jax.Array, epsilon: float | jax.Array,
                     mode: UpdateMode = "epsilon_greedy", primary: jax.Array | None = None,
                     lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Index of the response to cache per group (Eq. 9) and whether it is the best; rewards [B, G].

    ``key``: one PRNG key (split into one per group) or [B] keys, one per group. ``primary`` / ``lengths``
    [B, G]: the other ranking keys of "best" (``best_response``; see the module docstring)."""
    if mode not in ("epsilon_greedy", "authors"):
        raise ValueError(f"cache update: choose_responses needs mode 'epsilon_greedy' or 'authors', "
                         f"got {mode!r}")
    batch, group = rewards.shape
    best = best_response(rewards, primary, lengths)
    keys = jax.random.split(key, batch) if jnp.ndim(key) == 0 else key
    if keys.shape != (batch,):
        raise ValueError(f"cache update: expected one key or {batch} keys, got key shape {keys.shape}")

    def draw(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        key_coin, key_other = jax.random.split(k)
        return (jax.random.uniform(key_coin, ()),
                jax.random.randint(key_other, (), 0, max(group - 1, 1), dtype=jnp.int32))

    u, j = jax.vmap(draw)(keys)
    prob_best = AUTHORS_BEST_PROB if mode == "authors" else epsilon
    take_best = u < prob_best
    if group == 1:
        other = jnp.zeros((batch,), jnp.int32)
    elif mode == "authors":
        other = j  # randint(0, G - 1): indices 0..G-2
    else:
        other = j + (j >= best).astype(jnp.int32)  # uniform over the G-1 non-argmax indices: skip the argmax
    chosen = jnp.where(take_best, best, other)
    return chosen, chosen == best


def update(pool: CachePool, indices: jax.Array, tokens: jax.Array, lengths: jax.Array, rewards: jax.Array,
           key: jax.Array, *, epsilon: float | jax.Array = 0.1, mode: UpdateMode = "epsilon_greedy",
           primary: jax.Array | None = None) -> UpdateResult:
    """Eq. 9 for B groups: rows ``indices`` [B] get one of their group's responses.

    tokens [B, G, T] / lengths [B, G] are the FULL responses (prefix + continuation; see
    ``truncation.join_prefix_continuation``), rewards [B, G] (R, the shaped rewards), ``primary`` [B, G] the
    first key of "best" (correctness; see the module docstring). A response longer than max_len is cut.
    Pure and jittable (``mode`` must be static; ``epsilon`` may be traced).
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"cache update: mode must be one of {UPDATE_MODES}, got {mode!r}")
    if isinstance(epsilon, (int, float)) and not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"cache update: epsilon must be in [0, 1], got {epsilon}")
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    rewards = jnp.asarray(rewards, jnp.float32)
    indices = jnp.asarray(indices, jnp.int32)
    if tokens.ndim != 3 or lengths.shape != tokens.shape[:2] or rewards.shape != lengths.shape \
            or indices.shape != tokens.shape[:1]:
        raise ValueError(f"cache update: expected indices [B], tokens [B, G, T], lengths [B, G], rewards "
                         f"[B, G]; got {indices.shape}, {tokens.shape}, {lengths.shape}, {rewards.shape}")
    batch = indices.shape[0]
    if mode == "none":
        return UpdateResult(pool=pool, chosen=jnp.full((batch,), -1, jnp.int32),
                            took_best=jnp.zeros((batch,), jnp.bool_), updated=jnp.zeros((batch,), jnp.bool_))
    # one key per question row: the draws do not depend on batch position, padding or process count
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices.astype(jnp.uint32))
    chosen, took_best = choose_responses(rewards, row_keys, epsilon, mode, primary, lengths)
    rows = jnp.arange(batch)
    new_len = jnp.clip(lengths[rows, chosen], 0, pool.max_len)
    new_tokens = mask_beyond_length(fit_width(tokens[rows, chosen], pool.max_len, pool.pad_id), new_len,
                                    pool.pad_id)
    shortest = jnp.min(jnp.maximum(lengths, 0), axis=1)
    new_pool = write_rows(pool, indices, new_tokens, new_len, rewards[rows, chosen], shortest)
    updated = scatter_rows(indices, pool.num_questions) < pool.num_questions
    return UpdateResult(pool=new_pool, chosen=jnp.where(updated, chosen, -1), took_best=took_best & updated,
                        updated=updated)


@jax.jit
def replayed_fraction(pool: CachePool, indices: jax.Array) -> jax.Array:
    """Fraction of a step's groups (pool rows ``indices``; -1 = padding) whose cached answer came from an
    earlier rollout (an Eq. 9 update), not from the initialisation: with questions that come back, how much
    of the rollout continues the policy's own updated answers."""
    valid = indices >= 0
    replayed = valid & jnp.isfinite(pool.last_reward[jnp.where(valid, indices, 0)])
    return jnp.sum(replayed).astype(jnp.float32) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def cache_metrics(pool: CachePool, result: UpdateResult | None = None) -> dict[str, jax.Array]:
    """cache/* statistics as device scalars (fetch them when logging, not per step in a hot loop).

    Means over filled rows; mean_last_reward only over rows whose answer came from a rollout (finite
    reward). With ``result``: number of rows updated and the fraction of them that stored the argmax.
    """
    filled = pool.filled
    n_filled = jnp.sum(filled)
    denom = jnp.maximum(n_filled, 1).astype(jnp.float32)
    rewarded = filled & jnp.isfinite(pool.last_reward)
    def filled_mean(values: jax.Array) -> jax.Array:
        return jnp.sum(jnp.where(filled, values, 0), dtype=jnp.float32) / denom

    metrics = {
        "cache/filled_frac": jnp.mean(filled.astype(jnp.float32)),
        "cache/mean_length": filled_mean(pool.lengths),
        "cache/mean_shortest_len": filled_mean(pool.shortest_len),
        "cache/rewarded_frac": jnp.sum(rewarded).astype(jnp.float32) / denom,
        "cache/mean_last_reward": jnp.sum(jnp.where(rewarded, pool.last_reward, 0.0))
        / jnp.maximum(jnp.sum(rewarded), 1).astype(jnp.float32),
    }
    if result is not None:
        n_updated = jnp.sum(result.updated)
        metrics["cache/updates"] = n_updated.astype(jnp.float32)
        metrics["cache/took_best_frac"] = (jnp.sum(result.took_best & result.updated).astype(jnp.float32)
                                           / jnp.maximum(n_updated, 1).astype(jnp.float32))
    return metrics
