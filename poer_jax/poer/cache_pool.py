"""The POER experience cache pool C as device-resident arrays (paper Sec. 3.1, Eq. 1-2).

C holds one answer a_k per question q_k of the dataset D (Eq. 1); retrieval a_k := {a | (q_k, a) in C}
(Eq. 2) is a row gather by the question's dataset row index k. Answers are stored as token ids rather
than text (the authors' code stores decoded text and re-tokenises it, which drifts), right-padded with
``pad_id`` into a fixed [N, max_len] array so every operation is a static-shape gather/scatter that jits
and shards along the question axis N.

Per row k:
  tokens[k, :lengths[k]]  the cached answer a_k (the full response: prefix + continuation)
  lengths[k]              len(a_k); 0 means "no answer cached" (the rollout then starts from the question)
  filled[k]               lengths[k] > 0, kept explicitly so metrics need no recomputation
  last_reward[k]          reward of a_k when it was produced by a rollout; NaN when it was inserted without
                          one (initialisation from reference solutions or a file)
  shortest_len[k]         l of Eq. 4, the shortest response length of q_k's last group (dynamic truncation
                          L = fraction * l); initialised to len(a_k)

Row indices outside [0, N) are ignored by every writer (handy for padded batch rows), and when one batch
names the same row several times the LAST occurrence wins, deterministically (a plain XLA scatter leaves
the winner of duplicate indices unspecified).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ARRAY_FIELDS = ("tokens", "lengths", "last_reward", "filled", "shortest_len")
_DTYPES = {"tokens": np.int32, "lengths": np.int32, "last_reward": np.float32, "filled": np.bool_,
           "shortest_len": np.int32}
DEFAULT_DATA_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class CachePool:
    """Experience cache pool C (Eq. 1); a pytree whose leaves are the five arrays, ``pad_id`` is static."""

    tokens: jax.Array  # int32 [N, max_len]
    lengths: jax.Array  # int32 [N]
    last_reward: jax.Array  # float32 [N]
    filled: jax.Array  # bool [N]
    shortest_len: jax.Array  # int32 [N]
    pad_id: int = 0

    @property
    def num_questions(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.tokens.shape[1])


jax.tree_util.register_dataclass(CachePool, data_fields=list(ARRAY_FIELDS), meta_fields=["pad_id"])


def create(num_questions: int, max_len: int, pad_id: int) -> CachePool:
    """An empty pool: N = ``num_questions`` rows of ``max_len`` pad tokens, nothing filled."""
    if num_questions < 1 or max_len < 1:
        raise ValueError(f"cache pool: num_questions and max_len must be >= 1, "
                         f"got {num_questions}, {max_len}")
    return CachePool(
        tokens=jnp.full((num_questions, max_len), pad_id, jnp.int32),
        lengths=jnp.zeros((num_questions,), jnp.int32),
        last_reward=jnp.full((num_questions,), jnp.nan, jnp.float32),
        filled=jnp.zeros((num_questions,), jnp.bool_),
        shortest_len=jnp.zeros((num_questions,), jnp.int32),
        pad_id=int(pad_id),
    )


def fit_width(tokens: jax.Array, width: int, pad_id: int) -> jax.Array:
    """Right-pad or cut the last axis to ``width`` (static shapes: decided at trace time)."""
    cur = tokens.shape[-1]
    if cur > width:
        return tokens[..., :width]
    if cur < width:
        pad = [(0, 0)] * (tokens.ndim - 1) + [(0, width - cur)]
        return jnp.pad(tokens, pad, constant_values=pad_id)
    return tokens


def mask_beyond_length(tokens: jax.Array, lengths: jax.Array, pad_id: int) -> jax.Array:
    """Replace every position >= length by pad_id, so stale tokens past an answer never enter the pool."""
    pos = jnp.arange(tokens.shape[-1], dtype=jnp.int32)
    return jnp.where(pos < lengths[..., None], tokens, jnp.asarray(pad_id, tokens.dtype))


def scatter_rows(indices: jax.Array, num_rows: int) -> jax.Array:
    """Row targets for a ``mode="drop"`` scatter: invalid or superseded entries map to ``num_rows``.

    An index outside [0, N) is dropped; of duplicate indices only the last occurrence is kept. A stable
    argsort groups equal indices in batch order, so the last element of each run is the latest occurrence
    (O(B log B), unlike an all-pairs comparison).
    """
    indices = jnp.asarray(indices, jnp.int32)
    valid = (indices >= 0) & (indices < num_rows)
    if indices.shape[0] == 0:
        return indices
    order = jnp.argsort(indices, stable=True)
    ordered = indices[order]
    last_of_run = jnp.concatenate([ordered[1:] != ordered[:-1], jnp.ones((1,), jnp.bool_)])
    keep = jnp.zeros_like(valid).at[order].set(last_of_run)
    return jnp.where(valid & keep, indices, num_rows)


def insert(pool: CachePool, indices: jax.Array, tokens: jax.Array, lengths: jax.Array,
           rewards: jax.Array | None = None) -> CachePool:
    """Replace the answers of rows ``indices`` [K] by ``tokens`` [K, T] (first ``lengths`` [K] valid).

    T may differ from max_len: shorter rows are padded, longer ones cut and their length clamped to
    max_len. ``rewards`` [K] defaults to NaN (answer not produced by a rollout). ``shortest_len`` is reset
    to the new answer's length, as at initialisation. Pure and jittable.
    """
    tokens = fit_width(jnp.asarray(tokens, jnp.int32), pool.max_len, pool.pad_id)
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, pool.max_len)
    if rewards is None:
        rewards = jnp.full(lengths.shape, jnp.nan, jnp.float32)
    rewards = jnp.asarray(rewards, jnp.float32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1] or rewards.shape != lengths.shape:
        raise ValueError(f"cache insert: expected tokens [K, T], lengths [K], rewards [K]; got "
                         f"{tokens.shape}, {lengths.shape}, {rewards.shape}")
    return write_rows(pool, indices, mask_beyond_length(tokens, lengths, pool.pad_id), lengths, rewards,
                      lengths)


def write_rows(pool: CachePool, indices: jax.Array, tokens: jax.Array, lengths: jax.Array,
               rewards: jax.Array, shortest: jax.Array) -> CachePool:
    """Scatter already-shaped rows ([K, max_len] tokens masked past their lengths) into the pool."""
    rows = scatter_rows(indices, pool.num_questions)
    return dataclasses.replace(
        pool,
        tokens=pool.tokens.at[rows].set(tokens, mode="drop"),
        lengths=pool.lengths.at[rows].set(lengths, mode="drop"),
        last_reward=pool.last_reward.at[rows].set(rewards, mode="drop"),
        filled=pool.filled.at[rows].set(lengths > 0, mode="drop"),
        shortest_len=pool.shortest_len.at[rows].set(shortest.astype(jnp.int32), mode="drop"),
    )


# ----------------------------------------------------------------------------------------------- sharding

def _normalise_axes(mesh: Mesh, axis_names: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_names is None:
        return tuple(a for a in DEFAULT_DATA_AXES if a in mesh.shape)
    names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
        raise ValueError(f"cache pool sharding: axes {unknown} not in mesh axes {tuple(mesh.shape)}")
    return names


def question_axis_spec(num_questions: int, axis_sizes: Mapping[str, int],
                       axis_names: Sequence[str]) -> tuple[str, ...] | None:
    """Mesh axes to shard N over, or None (replicate) when N does not divide their product."""
    names = tuple(a for a in axis_names if axis_sizes[a] > 1)
    if not names or num_questions % math.prod(axis_sizes[a] for a in names):
        return None
    return names


def pool_sharding(pool: CachePool, mesh: Mesh, axis_names: str | Sequence[str] | None = None) -> CachePool:
    """A CachePool-shaped pytree of NamedShardings: the N axis over ``axis_names`` (default: the mesh's
    ``data``/``fsdp`` axes), replicated when N does not divide; usable as jit in/out_shardings."""
    names = _normalise_axes(mesh, axis_names)
    spec_n = question_axis_spec(pool.num_questions, dict(mesh.shape), names)
    return dataclasses.replace(
        pool,
        tokens=NamedSharding(mesh, P(spec_n, None)),
        **{f: NamedSharding(mesh, P(spec_n)) for f in ARRAY_FIELDS if f != "tokens"},
    )


def shard_pool(pool: CachePool, mesh: Mesh, axis_names: str | Sequence[str] | None = None) -> CachePool:
    """Place the pool on ``mesh`` following :func:`pool_sharding`."""
    return jax.device_put(pool, pool_sharding(pool, mesh, axis_names))


# ------------------------------------------------------------------------------------------ save / restore

def to_state_dict(pool: CachePool) -> dict[str, np.ndarray]:
    """Plain dict of host numpy arrays (checkpointable by orbax); one host transfer, not for hot loops."""
    state = {f: np.asarray(jax.device_get(getattr(pool, f))) for f in ARRAY_FIELDS}
    state["pad_id"] = np.asarray(pool.pad_id, np.int32)
    return state


def from_state_dict(state: Mapping[str, Any], sharding: CachePool | None = None) -> CachePool:
    """Exact inverse of :func:`to_state_dict`; ``sharding`` (from :func:`pool_sharding`) places it."""
    missing = [k for k in (*ARRAY_FIELDS, "pad_id") if k not in state]
    if missing:
        raise ValueError(f"cache pool state: missing keys {missing}")
    arrays = {}
    for f in ARRAY_FIELDS:
        arr = np.asarray(state[f])
        if arr.dtype != _DTYPES[f]:
            raise ValueError(f"cache pool state: key {f!r} has dtype {arr.dtype}, expected "
                             f"{np.dtype(_DTYPES[f])}")
        arrays[f] = arr
    n, max_len = arrays["tokens"].shape if arrays["tokens"].ndim == 2 else (-1, -1)
    if n < 1:
        raise ValueError(f"cache pool state: key 'tokens' must be [N, max_len], got {arrays['tokens'].shape}")
    for f in ARRAY_FIELDS[1:]:
        if arrays[f].shape != (n,):
            raise ValueError(f"cache pool state: key {f!r} has shape {arrays[f].shape}, expected ({n},)")
    host = CachePool(**arrays, pad_id=int(np.asarray(state["pad_id"])))
    return jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)
