"""The rollout batch the policy update trains on: one right-padded row per sampled response.

Row layout (``T`` on a geometric ladder of lengths, ``ladder_length``, so that a run compiles few shapes)::

    tokens          [ prompt | prefix | continuation | pad ... ]       int32 [B, T]
    attention_mask  [ 1 ...  | 1 ... | 1 ...         | 0 ... ]       bool  [B, T]   real tokens
    loss_mask       [ 0 ...  | p ... | 1 ...         | 0 ... ]       bool  [B, T]   trained tokens

``prefix`` is a_k^[0:-m], the reused part of the cached response, and ``continuation`` is what the policy
generated after it (paper Eq. 3); p = ``prefix_in_loss``.

Mask convention: masks index *tokens*. ``loss_mask[b, t]`` is True when token t of row b is trained; its
log-probability log pi(tokens[b, t] | tokens[b, :t]) comes from the logits at position t - 1, so position 0
is never trained (a prompt has at least one token). ``old_logp[b, t]`` / ``ref_logp[b, t]`` are the
log-probabilities of token t under the behaviour / reference policy, 0 where ``loss_mask`` is False.
RoPE positions are ``positions_from_mask(attention_mask)``.

``prefix_in_loss`` False (the paper, default): the prefix is part of the prompt and not trained.
True (the authors' code, see reference/poer-reference-code.md): prefix tokens get the policy gradient and
the KL too. The sampler never produced log-probs for the prefix, so the builder then leaves ``old_logp``
as None and the trainer computes all old log-probs itself (``PolicyTrainer.compute_logps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.sharding import BATCH_AXES, batch_sharding


class RolloutBatch(NamedTuple):
    """Arrays of one rollout (numpy on the host, jax on device). ``old_logp`` / ``ref_logp`` may be None:
    None ``old_logp`` means "not known, compute it (or train on-policy)"; None ``ref_logp`` means no
    reference log-probs (fine when the KL coefficient beta is 0)."""

    tokens: np.ndarray | jax.Array  # int32 [B, T]
    attention_mask: np.ndarray | jax.Array  # bool [B, T]
    loss_mask: np.ndarray | jax.Array  # bool [B, T]
    advantages: np.ndarray | jax.Array  # float32 [B]
    old_logp: np.ndarray | jax.Array | None = None  # float32 [B, T]
    ref_logp: np.ndarray | jax.Array | None = None  # float32 [B, T]

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def _check_ids(name: str, b: int, ids: Sequence[int]) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1) if len(ids) else np.zeros((0,), np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"batch.py: {name}[{b}] has a negative token id {int(arr.min())}")
    return arr


LENGTH_MULTIPLE = 128  # the trainer's padded lengths are ladder values, multiples of this (TPU attention tiles)


def bucket_length(n: int, bucket: int) -> int:
    """Smallest multiple of ``bucket`` that is >= max(n, 1)."""
    if bucket < 1:
        raise ValueError(f"batch.py: bucket must be >= 1, got {bucket}")
    return -(-max(n, 1) // bucket) * bucket


def ladder_length(n: int, multiple: int = 128, cap: int | None = None) -> int:
    """Padded length of a batch whose longest row has n tokens: the smallest 2^k or 3 * 2^(k-1) >= n, rounded
    up to ``multiple``, and at most ``cap`` rounded up to ``multiple`` (when n fits under it).

    Two lengths per octave: padding wastes at most a third, and lengths up to ``cap`` compile at most
    ``len(length_ladder(cap, multiple))`` shapes (11 for 4,608 tokens, against 72 multiples of 64).
    """
    if multiple < 1:
        raise ValueError(f"batch.py: multiple must be >= 1, got {multiple}")
    n = max(int(n), 1)
    p = 1 << (n - 1).bit_length()
    step = 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p
    out = bucket_length(step, multiple)
    if cap is not None and n <= cap:
        out = min(out, bucket_length(cap, multiple))
    return out


def length_ladder(cap: int, multiple: int = 128) -> list[int]:
    """Every length ``ladder_length`` returns for rows of 1..cap tokens (the compile budget of a program)."""
    out, n = [], 1
    while n <= cap:
        length = ladder_length(n, multiple, cap)
        out.append(length)
        n = length + 1
    return out


def build_rollout_batch(
    prompt_ids: Sequence[Sequence[int]],
    prefix_ids: Sequence[Sequence[int]] | None,
    continuation_ids: Sequence[Sequence[int]],
    advantages: Sequence[float] | np.ndarray,
    old_logps: Sequence[Sequence[float]] | None = None,
    *,
    pad_id: int,
    prefix_in_loss: bool = False,
    bucket: int = 64,
    min_length: int = 0,
    max_length: int | None = None,
) -> RolloutBatch:
    """Lay out B sampled rows as a ``RolloutBatch`` of numpy arrays (see the module docstring).

    Args:
      prompt_ids: per row, the prompt tokens q (repeat the prompt for each of the G rows of a group).
      prefix_ids: per row, the reused prefix a^[0:-m] (may be empty), or None for plain GRPO rows.
      continuation_ids: per row, the generated tokens, EOS included when the sample stopped.
      advantages: [B] per-row advantages (paper Eq. 6).
      old_logps: per row, the sampler's log-prob of each continuation token (same lengths), or None.
        Ignored (old_logp = None) when ``prefix_in_loss`` and some prefix is non-empty, since the
        sampler has no log-probs for prefix tokens.
      pad_id: token written into padding slots (never attended, never trained).
      prefix_in_loss: train the prefix tokens too (authors' code) instead of treating them as prompt.
      bucket: T = ``ladder_length(longest row, bucket, max_length)``: a ladder length, a multiple of this.
      min_length: T is at least this (multi-host: every process passes the longest row of all processes,
        so their local batches have one width).
      max_length: the longest row a run can have (prompt + completion): the ladder's top is this, rounded
        up to ``bucket``, instead of the next ladder step.
    """
    B = len(prompt_ids)
    if B == 0:
        raise ValueError("batch.py: empty batch (no prompt_ids)")
    if prefix_ids is None:
        prefix_ids = [[] for _ in range(B)]
    lists = {"prefix_ids": prefix_ids, "continuation_ids": continuation_ids}
    if old_logps is not None:
        lists["old_logps"] = old_logps
    for name, seq in lists.items():
        if len(seq) != B:
            raise ValueError(f"batch.py: {name} has {len(seq)} rows, prompt_ids has {B}")
    adv = np.asarray(advantages, dtype=np.float32)
    if adv.shape != (B,):
        raise ValueError(f"batch.py: advantages must have shape ({B},), got {adv.shape}")

    rows = []
    for b in range(B):
        prompt = _check_ids("prompt_ids", b, prompt_ids[b])
        prefix = _check_ids("prefix_ids", b, prefix_ids[b])
        cont = _check_ids("continuation_ids", b, continuation_ids[b])
        if prompt.size == 0:
            raise ValueError(f"batch.py: prompt_ids[{b}] is empty (token 0 has no log-prob, it cannot be trained)")
        if old_logps is not None and len(old_logps[b]) != cont.size:
            raise ValueError(
                f"batch.py: old_logps[{b}] has {len(old_logps[b])} entries, continuation_ids[{b}] has {cont.size}"
            )
        rows.append((prompt, prefix, cont))

    T = ladder_length(max(max(p.size + x.size + c.size for p, x, c in rows), int(min_length)), bucket, max_length)
    tokens = np.full((B, T), pad_id, np.int32)
    attention = np.zeros((B, T), bool)
    loss = np.zeros((B, T), bool)
    old = np.zeros((B, T), np.float32)
    any_prefix = False
    for b, (prompt, prefix, cont) in enumerate(rows):
        p, x, c = prompt.size, prefix.size, cont.size
        tokens[b, : p + x + c] = np.concatenate([prompt, prefix, cont])
        attention[b, : p + x + c] = True
        loss[b, (p if prefix_in_loss else p + x): p + x + c] = True
        any_prefix |= x > 0
        if old_logps is not None:
            old[b, p + x: p + x + c] = np.asarray(old_logps[b], np.float32)
    if old_logps is not None and not np.all(np.isfinite(old[loss])):
        bad = int(np.argwhere(~np.isfinite(np.where(loss, old, 0.0)))[0, 0])
        raise ValueError(f"batch.py: old_logps[{bad}] has a non-finite value")
    keep_old = old_logps is not None and not (prefix_in_loss and any_prefix)
    return RolloutBatch(tokens, attention, loss, adv, old if keep_old else None, None)


def shard_batch(batch: RolloutBatch, mesh: Mesh | None) -> RolloutBatch:
    """Put every array of ``batch`` on the mesh with its rows over ("data", "fsdp") (or on the default device
    when ``mesh`` is None). Rows must divide evenly over data x fsdp."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, batch)
    if isinstance(batch.tokens, jax.Array) and not batch.tokens.is_fully_addressable:
        return batch  # already a global array (multi-host)
    if jax.process_count() > 1:
        # multi-host: each process holds its own rows; together they form the global batch
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)), batch)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch.num_rows % n:
        raise ValueError(f"batch.py: {batch.num_rows} rows do not divide over data x fsdp = {n} devices")
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)


# ---- micro-batches: a batch's rows split into n parts -------------------------------------------------
def split_rows(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...]; part j holds rows b with b mod n = j, so a batch sharded in contiguous row
    blocks keeps every part spread over all devices."""
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def merge_rows(x: jax.Array) -> jax.Array:
    """Inverse of ``split_rows``."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def constrain_parts(tree: Any, mesh: Mesh | None) -> Any:
    """Shard the row axis (axis 1) of [n, rows, ...] arrays over the batch axes when it divides evenly."""
    if mesh is None:
        return tree
    n_dev = mesh.shape["data"] * mesh.shape["fsdp"]

    def one(x: jax.Array) -> jax.Array:
        if x.shape[1] % n_dev:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))

    return jax.tree.map(one, tree)


def split_rows_tree(batch: RolloutBatch, n: int) -> RolloutBatch:
    """``split_rows`` on every array of ``batch``."""
    return jax.tree.map(lambda x: split_rows(x, n), batch)
