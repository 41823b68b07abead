"""The group sampler's two device programs, data-parallel over the batch axes of the sampler mesh.

Each device of the batch axes (data x fsdp) owns a part of everything: ``num_pages`` pages of the KV pool
(the pool array [L, Hkv, D * num_pages, page, hd] is split over its page axis), R decode rows of G slots
(slot r * G + i holds sample i of the group in row r; row r's shared prefix pages are its ``shared_table``
row) and Q output rows. Both programs run under ``jax.shard_map`` over the batch axes, so each device sees
its own local page ids, slots and outputs and never exchanges KV with another; the ``tensor`` axis stays
automatic (weights and KV heads split over it as the partition rules say). Without a mesh the same local
functions run on one device.

  prefill_insert   prefill newly admitted groups (one forward per prompt; G first tokens from its last
                   logits), write their pages, set up their rows and slots, write the first tokens.
  decode_segment   ``decode_step`` in a ``lax.while_loop`` until no slot is active anywhere, or until the
                   host should admit waiting groups (``SegmentControl``): a device with waiting groups could
                   take the next one (its pages fit in the pages that finished samples will return and a row
                   is free) and either enough rows over all devices could be refilled (>= ``target``) or
                   that device is idle. The exit test costs one all-reduce of three scalars per step.
                   The tail (``tail_rows`` > 0): once nothing waits and every device's live rows fit in
                   ``tail_rows``, the live rows' slots move into a decode state of ``tail_rows`` rows (their
                   page tables, not their pages) and a second loop decodes them to the end, in the same
                   program: a batched decode runs until its longest sample stops, and on a CPU a step costs
                   about its rows, so the few long samples of a POER rollout no longer drag every finished
                   row through each step (same tokens; the sampler turns it on on CPU, ``tail_rows``).

Sample i of group g draws token t with fold_in(fold_in(fold_in(key, g), i), t) wherever it runs (device,
row, slot, segment), so the tokens do not depend on the pool size or the device count.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import Params
from poer_jax.model.sharding import BATCH_AXES
from poer_jax.sampler.engine import (
    DECODE_COMPILER_OPTIONS,
    DecodeState,
    InsertArrays,
    decode_step,
    insert_core,
    prefill_core,
)
from poer_jax.sampler.paged_attention import XLA, AttentionKernel, SharedPrefix, is_fused
from poer_jax.sampler.pages import SamplerConfig
from poer_jax.sampler.sampling import SamplingParams, sample_keys


class SlotState(NamedTuple):
    """A device's decode state: the engine's per-slot state (with this device's pool), each row's shared
    prefix pages (table [R, Ps], tokens in them [R]) and each slot's output row [S]."""

    decode: DecodeState
    shared_table: jax.Array
    shared_lengths: jax.Array
    out_row: jax.Array


class SampleBuffers(NamedTuple):
    """Per output row (sample) [Q, M]: tokens (pad past the end), sampling and policy log-probs (0 there);
    [Q]: tokens returned and finish code."""

    tokens: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    lengths: jax.Array
    finish: jax.Array


class PrefillBatch(NamedTuple):
    """Groups admitted on a device in one prefill call (N prompt rows, E = N x G sample entries, padded).

    tokens [N, T], true_lengths [N], group_ids [N] (uint32, the call-wide group index + offset: the key),
    rows [N] (decode row; R: padding), shared_table [N, Ps], shared_lengths [N]; insert: the engine's
    ``InsertArrays`` (local page ids, slots, budgets); out_row [E] (Q: padding)."""

    tokens: jax.Array
    true_lengths: jax.Array
    group_ids: jax.Array
    rows: jax.Array
    shared_table: jax.Array
    shared_lengths: jax.Array
    insert: InsertArrays
    out_row: jax.Array


class SegmentControl(NamedTuple):
    """What the host tells a decode segment (module docstring). Per device: pending [1] (waiting groups),
    free_pages [1], next_need [1] (pages of the next waiting group), slot_pages [S] (private pages of each
    slot's unreleased sample, 0 for an empty slot), row_pages [R] (shared pages of each occupied row);
    target [] (rows over all devices worth a refill)."""

    pending: jax.Array
    free_pages: jax.Array
    next_need: jax.Array
    slot_pages: jax.Array
    row_pages: jax.Array
    target: jax.Array


def decode_weights(params: Params, cfg: QwenConfig) -> Params:
    """Floating weights in the compute dtype ``cfg.dtype`` (bf16 sampler weights next to fp32 master
    weights). The model casts every weight to the compute dtype where it uses it (matmuls, norms,
    embedding), so this changes no output and halves the bytes of a bf16 model's fp32 weights."""
    dt = cfg.jnp_dtype
    return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


# ---- shardings --------------------------------------------------------------------------------------
def layer_shardings(shardings: Params, cfg: QwenConfig) -> Params:
    """The shardings of ``unstack_layers(params)`` given those of ``params``: each layer's slice is laid out as
    the stacked weight without its leading [L] axis."""

    def drop_layer_axis(s: Any) -> Any:
        return NamedSharding(s.mesh, P(*s.spec[1:])) if isinstance(s, NamedSharding) else s

    layer = jax.tree.map(drop_layer_axis, shardings["layers"])
    return {**shardings, "layers": tuple(layer for _ in range(cfg.num_layers))}


def batch_shards(mesh: Mesh | None) -> int:
    """Devices of the batch axes (D): each decodes its own rows from its own part of the pool."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def kv_head_axis(cfg: QwenConfig, mesh: Mesh | None) -> str | None:
    """'tensor' when the KV heads split evenly over it, else None (replicated)."""
    if mesh is None:
        return None
    tp = mesh.shape.get("tensor", 1)
    return "tensor" if tp > 1 and cfg.num_kv_heads % tp == 0 else None


def head_shards(cfg: QwenConfig, mesh: Mesh | None) -> int:
    return 1 if kv_head_axis(cfg, mesh) is None else int(mesh.shape["tensor"])  # type: ignore[union-attr]


def pool_shapes(
    cfg: QwenConfig, scfg: SamplerConfig, shards: int, kernel: AttentionKernel = XLA
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Global (k_pages, v_pages) shapes for ``shards`` devices of ``scfg.num_pages`` pages each: split K and V
    pools [L, Hkv, D * pages, page, hd], or with the pallas_tpu kernel the fused K/V pool [L, D * pages, page,
    2 Hkv, hd] and an empty v_pages placeholder (``paged_attention.pool_shapes``)."""
    n = shards * scfg.num_pages
    if kernel.fused:  # the xla kernel's page-minor pool (``paged_attention.pool_shapes``)
        return (cfg.num_layers, n, cfg.num_kv_heads, 2, scfg.page_size, cfg.head_dim), (0,)
    if kernel.fused_pool:
        return (cfg.num_layers, n, scfg.page_size, 2 * cfg.num_kv_heads, cfg.head_dim), (0,)
    split = (cfg.num_layers, cfg.num_kv_heads, n, scfg.page_size, cfg.head_dim)
    return split, split


def pool_sharding(cfg: QwenConfig, mesh: Mesh, kernel: AttentionKernel = XLA) -> NamedSharding:
    """K pool [L, Hkv, D * pages, page, hd]: pages over the batch axes, heads over 'tensor' when they divide
    (fused pool [L, D * pages, page, 2 Hkv, hd]: the same, a shard holding whole (k, v) head pairs)."""
    if kernel.fused:  # [L, D * pages, Hkv, 2, page, hd]
        return NamedSharding(mesh, P(None, BATCH_AXES, kv_head_axis(cfg, mesh), None, None, None))
    if kernel.fused_pool:
        return NamedSharding(mesh, P(None, BATCH_AXES, None, kv_head_axis(cfg, mesh), None))
    return NamedSharding(mesh, P(None, kv_head_axis(cfg, mesh), BATCH_AXES, None, None))


def pool_shardings(cfg: QwenConfig, mesh: Mesh, kernel: AttentionKernel = XLA) -> tuple[NamedSharding, NamedSharding]:
    """(k_pages, v_pages) shardings; the fused pool's empty v_pages placeholder is replicated."""
    k = pool_sharding(cfg, mesh, kernel)
    return k, (NamedSharding(mesh, P()) if kernel.fused_pool else k)


def rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _local_specs(tree: Any, fused: bool = False) -> Any:
    """shard_map specs over the batch axes: the pool along its page axis (axis 1 of the fused pool, whose
    empty v_pages placeholder is replicated), everything else by rows."""

    def spec(path: Any, x: Any) -> P:
        name = getattr(path[-1], "name", None)
        if name in ("k_pages", "v_pages"):
            if fused:
                return P(None, BATCH_AXES) if name == "k_pages" else P()
            return P(None, None, BATCH_AXES)
        if name == "target":
            return P()
        return P(BATCH_AXES)

    return jax.tree_util.tree_map_with_path(spec, tree)


def manual_axes(mesh: Mesh) -> frozenset[str]:
    """The axes the programs' shard_map takes manually: the batch axes, and every axis when the others have
    size 1 (then nothing is left to partition automatically, and Pallas kernels, which XLA cannot partition,
    as well as the Pallas interpreters' host callbacks, run inside the manual region)."""
    if all(mesh.shape[a] == 1 for a in mesh.axis_names if a not in BATCH_AXES):
        return frozenset(mesh.axis_names)
    return frozenset(BATCH_AXES)


def _over_batch(fn: Any, mesh: Mesh | None, in_specs: tuple[Any, ...], out_specs: Any) -> Any:
    """``fn`` under shard_map, manual over the batch axes (``tensor`` stays automatic when it splits the
    weights; ``manual_axes``), or ``fn`` itself without a mesh."""
    if mesh is None:
        return fn
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual_axes(mesh), check_vma=False
    )


# ---- prefill + insert ---------------------------------------------------------------------------------
def _prefill_insert_local(
    params: Params,
    state: SlotState,
    out: SampleBuffers,
    batch: PrefillBatch,
    key: jax.Array,
    *,
    cfg: QwenConfig,
    sp: SamplingParams,
    group_size: int,
    eos_ids: tuple[int, ...],
    kv_dtype: Any,
) -> tuple[SlotState, SampleBuffers]:
    group_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch.group_ids)  # independent of placement
    prefix = prefill_core(
        params, cfg, batch.tokens, batch.true_lengths, sample_keys(group_keys, group_size), sp, kv_dtype
    )
    ins = batch.insert
    dec = insert_core(prefix, state.decode, ins, eos_ids, None)
    slot = jnp.minimum(ins.slot, dec.finish.shape[0] - 1)  # padding entries: any slot, dropped below
    first = [x[ins.prefix, ins.sample] for x in (prefix.tokens, prefix.logprobs, prefix.policy_logprobs)]
    row = batch.out_row
    out = SampleBuffers(
        *(o.at[row, 0].set(f.astype(o.dtype), mode="drop") for o, f in zip(out[:3], first, strict=True)),
        out.lengths.at[row].set(1, mode="drop"),
        out.finish.at[row].set(dec.finish[slot], mode="drop"),
    )
    state = SlotState(
        dec,
        state.shared_table.at[batch.rows].set(batch.shared_table, mode="drop"),
        state.shared_lengths.at[batch.rows].set(batch.shared_lengths, mode="drop"),
        state.out_row.at[ins.slot].set(row, mode="drop"),
    )
    return state, out


@partial(
    jax.jit,
    static_argnames=("cfg", "sp", "group_size", "eos_ids", "kv_dtype", "mesh"),
    donate_argnames=("state", "out"),
)
def prefill_insert(
    params: Params,
    state: SlotState,
    out: SampleBuffers,
    batch: PrefillBatch,
    key: jax.Array,
    *,
    cfg: QwenConfig,
    sp: SamplingParams,
    group_size: int,
    eos_ids: tuple[int, ...],
    kv_dtype: Any,
    mesh: Mesh | None,
) -> tuple[SlotState, SampleBuffers]:
    """Prefill the groups of ``batch`` on every device and insert their samples (module docstring)."""
    fn = partial(_prefill_insert_local, cfg=cfg, sp=sp, group_size=group_size, eos_ids=eos_ids, kv_dtype=kv_dtype)
    specs = (_local_specs(state, is_fused(state.decode.k_pages, state.decode.v_pages)), _local_specs(out))
    return _over_batch(fn, mesh, (P(), *specs, _local_specs(batch), P()), specs)(params, state, out, batch, key)


# ---- decode segment -----------------------------------------------------------------------------------
def _refill_wanted(dec: DecodeState, ctl: SegmentControl, rows: int) -> tuple[jax.Array, jax.Array]:
    """(rows this device could refill now, 1 if it is idle with a waiting group that fits): pages of
    finished samples and of groups whose samples all finished come back at the next host visit."""
    active = dec.active.reshape(rows, -1)
    idle_row = ~active.any(axis=1)
    freed = jnp.sum(jnp.where(dec.active, 0, ctl.slot_pages)) + jnp.sum(jnp.where(idle_row, ctl.row_pages, 0))
    fits = (ctl.pending[0] > 0) & (ctl.free_pages[0] + freed >= ctl.next_need[0]) & idle_row.any()
    want = jnp.where(fits, jnp.minimum(ctl.pending[0], jnp.sum(idle_row)), 0)
    starving = fits & ~dec.active.any()
    return want.astype(jnp.int32), starving.astype(jnp.int32)


def _decode_segment_local(
    params: Params,
    state: SlotState,
    out: SampleBuffers,
    ctl: SegmentControl,
    *,
    cfg: QwenConfig,
    sp: SamplingParams,
    eos_ids: tuple[int, ...],
    chunk_pages: int,
    pad_id: int,
    dynamic_chunks: bool,
    shared_chunk_pages: int,
    axes: tuple[str, ...] | None,
    attention_kernel: AttentionKernel,
    tail_rows: int,
) -> tuple[SlotState, SampleBuffers, jax.Array]:
    R = state.shared_lengths.shape[0]
    G = state.decode.active.shape[0] // R
    Q, M = out.tokens.shape
    total = (lambda x: jax.lax.psum(x, axes)) if axes else (lambda x: x)
    most = (lambda x: jax.lax.pmax(x, axes)) if axes else (lambda x: x)

    def tail_now(dec: DecodeState) -> jax.Array:
        """Nothing waits anywhere and every device's live rows fit in ``tail_rows`` (module docstring)."""
        if not tail_rows:
            return jnp.zeros((), bool)
        live = jnp.sum(dec.active.reshape(R, G).any(axis=1)).astype(jnp.int32)
        return (total(ctl.pending[0]) == 0) & (most(live) <= tail_rows)

    def cond(c: tuple[DecodeState, SampleBuffers, jax.Array]) -> jax.Array:
        dec, _, steps = c
        want, starving = _refill_wanted(dec, ctl, R)
        active, want, starving = total(jnp.stack([dec.active.any().astype(jnp.int32), want, starving]))
        return (active > 0) & (want < ctl.target) & (starving == 0) & (steps < M) & ~tail_now(dec)

    def body_of(out_row: jax.Array, shared: SharedPrefix) -> Any:
        """A decode step of the slots in ``out_row``'s order, writing their tokens to the output rows."""

        def body(c: tuple[DecodeState, SampleBuffers, jax.Array]) -> tuple[DecodeState, SampleBuffers, jax.Array]:
            dec, o, steps = c
            dec, r = decode_step(
                params, cfg, dec, sp, eos_ids, chunk_pages, pad_id, None, dynamic_chunks, shared,
                shared_chunk_pages, attention_kernel,
            )
            row = jnp.where(r.valid, out_row, Q)  # out of range: dropped
            col = jnp.where(r.valid, r.index, M)
            o = o._replace(
                tokens=o.tokens.at[row, col].set(r.tokens, mode="drop"),
                logprobs=o.logprobs.at[row, col].set(r.logprobs, mode="drop"),
                policy_logprobs=o.policy_logprobs.at[row, col].set(r.policy_logprobs, mode="drop"),
            )
            return dec, o, steps + 1

        return body

    # finished slots and empty rows attend nothing: the attention loops stop at the longest live sequence
    dec = state.decode
    live_row = dec.active.reshape(R, -1).any(axis=1)
    shared = SharedPrefix(state.shared_table, jnp.where(live_row, state.shared_lengths, 0))
    dec = dec._replace(lengths=jnp.where(dec.active, dec.lengths, 0))
    started = dec.active
    zero = jnp.zeros((), jnp.int32)
    dec, out, steps = jax.lax.while_loop(cond, body_of(state.out_row, shared), (dec, out, zero))
    tail = zero
    if tail_rows:
        dec, out, tail = _decode_tail(dec, out, state, steps, tail_rows, tail_now(dec), total, body_of)
    # a slot holds one sample for the whole segment: the count and finish code of each sample that ran go out
    # once, at the end (samples done at insert got theirs from prefill_insert)
    row = jnp.where(started, state.out_row, out.lengths.shape[0])
    out = out._replace(lengths=out.lengths.at[row].set(dec.num_generated, mode="drop"),
                       finish=out.finish.at[row].set(dec.finish, mode="drop"))
    return state._replace(decode=dec), out, jnp.stack([steps + tail, tail])[None]


def decode_tail_rows(mode: str, platform: str, rows: int) -> int:
    """Rows of a decode segment's tail (``SamplerConfig.tail_rows``): a quarter of the ``rows`` (when there are 4 or
    more) with 'on', or with 'auto' on CPU, where a decode step costs about its rows; else 0 (no tail phase)."""
    on = mode == "on" or (mode == "auto" and platform == "cpu")
    return rows // 4 if on and rows >= 4 else 0


def _decode_tail(dec: DecodeState, out: SampleBuffers, state: SlotState, steps: jax.Array, tail_rows: int,
                 go: jax.Array, total: Any, body_of: Any) -> tuple[DecodeState, SampleBuffers, jax.Array]:
    """The end of a segment on ``tail_rows`` rows: the live rows' slots gathered into a smaller decode state (the
    KV pool is shared: their page tables move, not their pages), decoded to the end and scattered back. A
    sample's tokens do not depend on its slot, so no token changes; a step computes ``tail_rows`` of the R rows.
    ``go`` false (a refill is due, or nothing is live): no step runs and nothing changes."""
    R, S = state.shared_lengths.shape[0], dec.active.shape[0]
    G = S // R
    Q, M = out.tokens.shape
    live_row = dec.active.reshape(R, G).any(axis=1)
    picked = jnp.nonzero(live_row, size=tail_rows, fill_value=R)[0]  # the live rows, then R as padding
    valid_row = picked < R
    rows = jnp.minimum(picked, R - 1)
    slots = (rows[:, None] * G + jnp.arange(G, dtype=rows.dtype)[None, :]).reshape(-1)
    valid = jnp.repeat(valid_row, G)
    active = dec.active[slots] & valid
    sub = DecodeState(
        dec.k_pages, dec.v_pages, dec.page_table[slots], jnp.where(active, dec.lengths[slots], 0),
        dec.cur_token[slots], dec.num_generated[slots], dec.budget[slots], active, dec.finish[slots], dec.keys[slots],
    )
    shared = SharedPrefix(state.shared_table[rows], jnp.where(valid_row, state.shared_lengths[rows], 0))
    out_row = jnp.where(valid, state.out_row[slots], Q)

    def cond(c: tuple[DecodeState, SampleBuffers, jax.Array]) -> jax.Array:
        sub, _, n = c
        return go & (total(sub.active.any().astype(jnp.int32)) > 0) & (steps + n < M)

    sub, out, n = jax.lax.while_loop(cond, body_of(out_row, shared), (sub, out, jnp.zeros((), jnp.int32)))
    back = jnp.where(valid, slots, S)  # padding slots: dropped

    def put(a: jax.Array, v: jax.Array) -> jax.Array:
        return a.at[back].set(v, mode="drop")

    dec = dec._replace(k_pages=sub.k_pages, v_pages=sub.v_pages, lengths=put(dec.lengths, sub.lengths),
                       cur_token=put(dec.cur_token, sub.cur_token),
                       num_generated=put(dec.num_generated, sub.num_generated), active=put(dec.active, sub.active),
                       finish=put(dec.finish, sub.finish))
    return dec, out, n


@partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "sp",
        "eos_ids",
        "chunk_pages",
        "pad_id",
        "dynamic_chunks",
        "shared_chunk_pages",
        "mesh",
        "attention_kernel",
        "tail_rows",
    ),
    donate_argnames=("state", "out"),
    compiler_options=DECODE_COMPILER_OPTIONS,
)
def decode_segment(
    params: Params,
    state: SlotState,
    out: SampleBuffers,
    ctl: SegmentControl,
    *,
    cfg: QwenConfig,
    sp: SamplingParams,
    eos_ids: tuple[int, ...],
    chunk_pages: int,
    pad_id: int,
    dynamic_chunks: bool,
    shared_chunk_pages: int,
    mesh: Mesh | None,
    attention_kernel: AttentionKernel = XLA,
    tail_rows: int = 0,
) -> tuple[SlotState, SampleBuffers, jax.Array]:
    """Decode every device's active slots until the host should refill or all are done (module docstring).
    Returns the state, the outputs and [D, 2]: the steps run and how many of them ran on the ``tail_rows``
    rows of the tail (equal on every device; 0 = no tail phase). ``params["layers"]`` stacked runs a layer
    scan, a tuple of per-layer weights (``GroupSampler.update_params`` on CPU) the layers unrolled;
    ``attention_kernel``: the paged-attention code (``paged_attention.attention_kernel``). Compiled with
    ``DECODE_COMPILER_OPTIONS``."""
    fn = partial(
        _decode_segment_local,
        cfg=cfg,
        sp=sp,
        eos_ids=eos_ids,
        chunk_pages=chunk_pages,
        pad_id=pad_id,
        dynamic_chunks=dynamic_chunks,
        shared_chunk_pages=shared_chunk_pages,
        axes=None if mesh is None else BATCH_AXES,
        attention_kernel=attention_kernel,
        tail_rows=tail_rows,
    )
    specs = (_local_specs(state, is_fused(state.decode.k_pages, state.decode.v_pages)), _local_specs(out))
    return _over_batch(fn, mesh, (P(), *specs, _local_specs(ctl)), (*specs, P(BATCH_AXES)))(params, state, out, ctl)


def empty_slots(slots: int, rows: int, table_width: int, shared_width: int, shards: int) -> SlotState:
    """Host arrays of an idle decode state for ``shards`` devices (leading axes = shards x local size), the
    pool left out (None: the caller puts its pool in)."""
    S, R = shards * slots, shards * rows

    def z(n: int, dtype: Any = np.int32) -> np.ndarray:
        return np.zeros((n,), dtype)

    dec = DecodeState(
        None, None, np.zeros((S, table_width), np.int32), z(S), z(S), z(S), z(S), z(S, bool), z(S),  # type: ignore[arg-type]
        np.zeros((S, 2), np.uint32),
    )
    return SlotState(dec, np.zeros((R, shared_width), np.int32), z(R), z(S))  # type: ignore[arg-type]


def empty_buffers(rows: int, width: int, pad_id: int) -> SampleBuffers:
    """Host arrays of empty output buffers for ``rows`` samples of up to ``width`` tokens."""
    return SampleBuffers(
        np.full((rows, width), pad_id, np.int32),  # type: ignore[arg-type]
        np.zeros((rows, width), np.float32),  # type: ignore[arg-type]
        np.zeros((rows, width), np.float32),  # type: ignore[arg-type]
        np.zeros((rows,), np.int32),  # type: ignore[arg-type]
        np.zeros((rows,), np.int32),  # type: ignore[arg-type]
    )
