"""Paged-KV decode engine in JetStream's shape: prefill -> insert -> generate, token ids in and out.

For people who serve models with JetStream-style orchestrators, ``PagedEngine`` maps onto that interface:

  engine.prefill(params=, padded_tokens=, true_length=, key=, num_samples=G) -> (Prefix, ResultTokens)
      one forward over the prompt: KV of every layer + G first tokens sampled from its last logits
      (JetStream HEAD's ``prefill_multisampling``).
  engine.insert(prefix, decode_state, slot, max_new_tokens)
  engine.bulk_insert(prefix, decode_state, slots, max_new_tokens)
      allocate pages on the host, write the prompt's full pages once (shared by all slots of the group) and
      copy its partial last page per slot (copy on write). Unlike JetStream, insert takes the new-token
      budget: pages for prompt + budget are reserved at insert time, so decode never allocates.
  engine.generate(params, decode_state) -> (decode_state, ResultTokens)   one step for all slots
  engine.free_resource(slot, decode_state=None)   release the slot's pages; pass the state to also stop the
      slot if it may still be running (a running slot must not outlive its pages).
  engine.init_decode_state(), engine.max_concurrent_decodes, engine.max_prefill_length

The pure functions below (``prefill_core``, ``insert_core``, ``decode_step``) are the ones the group sampler
runs on every device of its mesh (``sharded.py``: prefill + insert of admitted groups, and decode segments,
``decode_step`` in a ``lax.while_loop``). A token's sampling key is fold_in(sample_key, token_index), so a
sample's draws do not depend on its slot, the batch padding, its device or how many steps run per dispatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.model.qwen import (
    Params,
    attention_inputs,
    attention_output,
    embed,
    final_norm,
    forward,
    logits_from_hidden,
)
from poer_jax.sampler.paged_attention import (
    XLA,
    AttentionKernel,
    SharedPrefix,
    attention_chunk_pages,
    attention_kernel,
    dynamic_attention_chunks,
    empty_pool,
    kv_sharding,
    paged_decode_attention,
    write_decode_kv,
    write_prefill_pages,
)
from poer_jax.sampler.pages import (
    PageAllocator,
    PoolExhaustedError,
    SamplerConfig,
    SamplerError,
    allocate_groups,
    build_page_arrays,
    prefill_bucket,
    round_up,
    validate_budget,
    validate_prompt,
)
from poer_jax.sampler.sampling import SamplingParams, as_key, sample_keys, sample_tokens, token_keys

FINISH_NONE, FINISH_EOS, FINISH_BUDGET = 0, 1, 2
FINISH_REASONS = ("none", "eos", "budget")


class Prefix(NamedTuple):
    """Prefilled prompts. k/v [L, N, T, Hkv, hd]; per prompt n and sample i: first token, its two log-probs,
    the sample's key data [N, G, 2] (uint32)."""

    k: jax.Array
    v: jax.Array
    true_lengths: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    keys: jax.Array


class DecodeState(NamedTuple):
    """Device state of all decode slots. ``lengths`` = cached tokens = position of ``cur_token`` (sampled, its
    KV not yet computed); ``num_generated`` counts returned tokens including ``cur_token``."""

    k_pages: jax.Array  # [L, Hkv, N, page, hd]; the fused [L, N, page, 2 Hkv, hd] with pallas_tpu
    v_pages: jax.Array  # like k_pages; with pallas_tpu an empty placeholder (paged_attention.pool_shapes)
    page_table: jax.Array  # [S, P] int32
    lengths: jax.Array  # [S] int32
    cur_token: jax.Array  # [S] int32
    num_generated: jax.Array  # [S] int32
    budget: jax.Array  # [S] int32
    active: jax.Array  # [S] bool
    finish: jax.Array  # [S] int32, FINISH_*
    keys: jax.Array  # [S, 2] uint32 key data


class ResultTokens(NamedTuple):
    """One step's output for every slot: token (pad where not ``valid``), its index in the sample's output,
    sampling / policy log-probs and the finish code after this step."""

    tokens: jax.Array
    valid: jax.Array
    index: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    finish: jax.Array


class InsertArrays(NamedTuple):
    """Device copy of ``pages.PageArrays`` (see there)."""

    shared_dest: jax.Array
    slot: jax.Array
    tables: jax.Array
    partial_dest: jax.Array
    prefix: jax.Array
    sample: jax.Array
    budgets: jax.Array

    @classmethod
    def from_host(cls, a: Any) -> InsertArrays:
        return cls(*(jnp.asarray(getattr(a, f)) for f in cls._fields))


def _constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None or x.size == 0:  # size 0: the fused pool's v_pages placeholder
        return x
    return jax.lax.with_sharding_constraint(x, sharding)


def _is_eos(tok: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tok.shape, bool)
    return jnp.any(tok[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)


def empty_state(
    k_pages: jax.Array | None, v_pages: jax.Array | None, num_slots: int, table_width: int
) -> DecodeState:
    def z(dtype: Any = jnp.int32) -> jax.Array:  # a fresh buffer per field: the state is donated leaf by leaf
        return jnp.zeros((num_slots,), dtype)

    table, keys = jnp.zeros((num_slots, table_width), jnp.int32), jnp.zeros((num_slots, 2), jnp.uint32)
    return DecodeState(k_pages, v_pages, table, z(), z(), z(), z(), z(bool), z(), keys)


# ---- pure steps ---------------------------------------------------------------------------------------
def prefill_core(
    params: Params,
    cfg: QwenConfig,
    tokens: jax.Array,
    true_lengths: jax.Array,
    keys: jax.Array,
    sp: SamplingParams,
    kv_dtype: Any,
) -> Prefix:
    """Forward over right-padded prompts tokens [N, T] (positions 0..T-1, keys masked past true_lengths), keep
    every layer's KV, and sample G first tokens per prompt from its last real position (keys [N, G, 2])."""
    N, T = tokens.shape
    G = keys.shape[1]
    mask = jnp.arange(T, dtype=jnp.int32)[None, :] < true_lengths[:, None]
    hidden, (k, v) = forward(params, cfg, tokens, None, mask, return_kv=True)
    last = hidden[jnp.arange(N), jnp.maximum(true_lengths - 1, 0)]
    logits = logits_from_hidden(params, cfg, last)  # [N, V]
    flat = keys.reshape(N * G, 2)
    tok, lp, plp = sample_tokens(
        jnp.repeat(logits, G, axis=0), token_keys(flat, jnp.zeros((N * G,), jnp.int32)), sp
    )
    firsts = (x.reshape(N, G) for x in (tok, lp, plp))
    return Prefix(k.astype(kv_dtype), v.astype(kv_dtype), true_lengths.astype(jnp.int32), *firsts, keys)


def insert_core(
    prefix: Prefix,
    state: DecodeState,
    arrays: InsertArrays,
    eos_ids: tuple[int, ...],
    kv_shard: NamedSharding | None = None,
) -> DecodeState:
    """Write the prefix pages (shared + per-entry partial copies) and set up the entries' slots."""
    k_pages, v_pages = write_prefill_pages(
        state.k_pages,
        state.v_pages,
        prefix.k,
        prefix.v,
        prefix.true_lengths,
        arrays.shared_dest,
        arrays.prefix,
        arrays.partial_dest,
    )
    first = prefix.tokens[arrays.prefix, arrays.sample]
    finish = jnp.where(
        _is_eos(first, eos_ids), FINISH_EOS, jnp.where(arrays.budgets <= 1, FINISH_BUDGET, FINISH_NONE)
    ).astype(jnp.int32)

    def put(a: jax.Array, v: jax.Array) -> jax.Array:
        return a.at[arrays.slot].set(v.astype(a.dtype), mode="drop")

    return DecodeState(
        _constrain(k_pages, kv_shard),
        _constrain(v_pages, kv_shard),
        put(state.page_table, arrays.tables),
        put(state.lengths, prefix.true_lengths[arrays.prefix]),
        put(state.cur_token, first),
        put(state.num_generated, jnp.ones_like(first)),
        put(state.budget, arrays.budgets),
        put(state.active, finish == FINISH_NONE),
        put(state.finish, finish),
        put(state.keys, prefix.keys[arrays.prefix, arrays.sample]),
    )


def decode_step(
    params: Params,
    cfg: QwenConfig,
    state: DecodeState,
    sp: SamplingParams,
    eos_ids: tuple[int, ...],
    chunk_pages: int,
    pad_id: int,
    kv_shard: NamedSharding | None = None,
    dynamic_chunks: bool = True,
    shared: SharedPrefix | None = None,
    shared_chunk_pages: int = 1,
    attention_kernel: AttentionKernel = XLA,
) -> tuple[DecodeState, ResultTokens]:
    """Feed each slot's ``cur_token`` at position ``lengths``, sample the next token, store its KV.

    Inactive slots compute along (static shapes) but write no KV and return ``pad_id`` / invalid. With
    ``shared`` (cascade attention, slots group-major), ``page_table`` holds each slot's private pages only.
    ``params["layers"]`` is stacked (one ``lax.scan``) or a tuple of per-layer dicts (``unstack_layers``:
    the step is unrolled over layers); ``attention_kernel`` picks the paged-attention code.
    """
    pos = state.lengths

    def layer(x: jax.Array, xs: tuple[Params, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        lp, li = xs
        q, k, v = attention_inputs(lp, cfg, x, pos[:, None])
        attn = paged_decode_attention(
            q[:, 0],
            k[:, 0],
            v[:, 0],
            state.k_pages,
            state.v_pages,
            li,
            state.page_table,
            pos,
            chunk_pages,
            dynamic_chunks,
            shared,
            shared_chunk_pages,
            attention_kernel,
        )
        return attention_output(lp, cfg, x, attn[:, None]), (k[:, 0].swapaxes(0, 1), v[:, 0].swapaxes(0, 1))

    x = embed(params, cfg, state.cur_token[:, None])
    if isinstance(params["layers"], (tuple, list)):  # unstacked (see ``unstack_layers``): one block per layer
        kv = []
        for i, lp in enumerate(params["layers"]):
            x, kv_i = layer(x, (lp, jnp.int32(i)))
            kv.append(kv_i)
        k_new, v_new = (jnp.stack(t) for t in zip(*kv, strict=True))
    else:
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        x, (k_new, v_new) = jax.lax.scan(layer, x, (params["layers"], layer_ids))
    logits = logits_from_hidden(params, cfg, final_norm(params, cfg, x[:, 0]))
    tok, lp, plp = sample_tokens(logits, token_keys(state.keys, state.num_generated), sp)
    active = state.active
    start = None if shared is None else jnp.repeat(shared.lengths, pos.shape[0] // shared.lengths.shape[0])
    # The KV write must come after every layer's attention has read the pool, or XLA copies the whole pool (K
    # and V, twice each: ~100 MB per step on the h896 shape) to write it early: nothing else orders the last
    # layer's write after that layer's reads. Where it writes now depends on the sampled token (always >= 0),
    # hence on every read, and the scatter updates the pool in place.
    writes = active & (tok >= 0)
    k_pages, v_pages = write_decode_kv(
        state.k_pages, state.v_pages, k_new, v_new, state.page_table, pos, writes, start
    )
    num_generated = state.num_generated + active.astype(jnp.int32)
    finish = jnp.where(
        active & _is_eos(tok, eos_ids),
        FINISH_EOS,
        jnp.where(active & (num_generated >= state.budget), FINISH_BUDGET, state.finish),
    )
    result = ResultTokens(
        jnp.where(active, tok, pad_id),
        active,
        state.num_generated,
        jnp.where(active, lp, 0.0),
        jnp.where(active, plp, 0.0),
        finish,
    )
    new_state = state._replace(
        k_pages=_constrain(k_pages, kv_shard),
        v_pages=_constrain(v_pages, kv_shard),
        lengths=pos + active.astype(jnp.int32),
        cur_token=jnp.where(active, tok, state.cur_token),
        num_generated=num_generated,
        active=active & (finish == FINISH_NONE),
        finish=finish,
    )
    return new_state, result


def unstack_layers(params: Params, cfg: QwenConfig) -> Params:
    """``params`` with ``layers`` as a tuple of per-layer dicts (static slices of the stacked arrays).

    Why: inside a loop, a layer scan reads layer l's weights through a dynamic slice, which XLA:CPU
    materialises before every matmul, so each decode step copies all weights once on top of reading them.
    Sliced outside the decode loop, the step reads the weights only. ``GroupSampler`` slices once per weight
    update (``update_params``) and keeps the slices: sliced inside a decode program, XLA copies every weight
    once per call (~10 ms per step of a 128-token call on the h896 shape; docs/benchmarks.md).
    """
    stacked = params["layers"]
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.num_layers))
    return {**params, "layers": layers}


def stack_layers(params: Params) -> Params:
    """The inverse of ``unstack_layers``: per-layer dicts stacked along a leading [L] axis (a copy)."""
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])}


def unroll_decode_layers(scfg: SamplerConfig, mesh: Mesh | None) -> bool:
    """``SamplerConfig.layer_loop``; 'auto' unrolls on CPU, where it avoids a copy of every layer's weights per
    step (measured: see docs/benchmarks.md); TPU and GPU keep the scan (smaller programs)."""
    if scfg.layer_loop != "auto":
        return scfg.layer_loop == "unrolled"
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return device.platform == "cpu"


DECODE_STATIC = (
    "cfg",
    "sp",
    "eos_ids",
    "chunk_pages",
    "pad_id",
    "kv_shard",
    "dynamic_chunks",
    "shared_chunk_pages",
    "attention_kernel",
)
# XLA options of the decode programs. XLA:CPU's YNNPACK dot fusions run the decode step's small-M matmuls
# (M = decode slots, e.g. 8) about 1.3x slower than its Eigen dots (measured on the h896 shape: 164 -> 134 ms
# CPU per step; docs/benchmarks.md), so the decode programs compile without them. Other backends ignore the
# option (it is a field of the shared DebugOptions; the TPU-topology compile test compiles with it).
DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_prefill_jit = jax.jit(prefill_core, static_argnames=("cfg", "sp", "kv_dtype"))
_insert_jit = jax.jit(insert_core, static_argnames=("eos_ids", "kv_shard"), donate_argnames=("state",))
_generate_jit = jax.jit(
    decode_step,
    static_argnames=DECODE_STATIC,
    donate_argnames=("state",),
    compiler_options=DECODE_COMPILER_OPTIONS,
)


class PagedEngine:
    """JetStream-shaped engine over the paged KV cache (module docstring); host-side page allocator."""

    def __init__(self, cfg: QwenConfig, scfg: SamplerConfig, mesh: Mesh | None = None) -> None:
        self.cfg, self.scfg, self.mesh = cfg, scfg, mesh
        self.allocator = PageAllocator(scfg.num_pages)
        self.chunk_pages = min(attention_chunk_pages(scfg, mesh), scfg.max_pages_per_seq)
        self.table_width = round_up(scfg.max_pages_per_seq, self.chunk_pages)
        self.attention_kernel = attention_kernel(scfg, mesh)
        self.kv_shard = kv_sharding(cfg, mesh, self.attention_kernel)
        self.kv_dtype = dtype_from_name(scfg.kv_dtype or cfg.dtype)
        self.dynamic_chunks = dynamic_attention_chunks(scfg, mesh)
        self._slot_pages: dict[int, list[int]] = {}

    @property
    def max_concurrent_decodes(self) -> int:
        return self.scfg.max_slots

    @property
    def max_prefill_length(self) -> int:
        return self.scfg.max_prefill_length

    def init_decode_state(self) -> DecodeState:
        placement = self.kv_shard if self.kv_shard is not None else jax.devices()[0]
        k, v = empty_pool(self.cfg, self.scfg, self.kv_dtype, self.attention_kernel, placement)
        return empty_state(k, v, self.scfg.max_slots, self.table_width)

    def prefill(
        self, *, params: Params, padded_tokens: Any, true_length: int, key: jax.Array, num_samples: int = 1
    ) -> tuple[Prefix, ResultTokens]:
        toks = validate_prompt(np.asarray(padded_tokens)[:true_length], self.cfg, self.scfg, "prefill")
        T = prefill_bucket(true_length, self.scfg.page_size)
        padded = np.full((1, T), self.scfg.pad_id, np.int32)
        padded[0, :true_length] = toks
        keys = sample_keys(as_key(key)[None], int(num_samples))
        prefix = _prefill_jit(
            params,
            self.cfg,
            jnp.asarray(padded),
            jnp.asarray([true_length], jnp.int32),
            keys,
            self.scfg.sampling,
            self.kv_dtype,
        )
        g = jnp.arange(num_samples, dtype=jnp.int32)
        first = ResultTokens(
            prefix.tokens[0],
            jnp.ones((num_samples,), bool),
            jnp.zeros_like(g),
            prefix.logprobs[0],
            prefix.policy_logprobs[0],
            jnp.where(_is_eos(prefix.tokens[0], self.scfg.eos_ids), FINISH_EOS, FINISH_NONE),
        )
        return prefix, first

    def insert(
        self, prefix: Prefix, decode_state: DecodeState, slot: int, max_new_tokens: int
    ) -> DecodeState:
        return self.bulk_insert(prefix, decode_state, [slot], max_new_tokens)

    def bulk_insert(
        self,
        prefix: Prefix,
        decode_state: DecodeState,
        slots: Sequence[int],
        max_new_tokens: int | Sequence[int],
    ) -> DecodeState:
        """Samples 0..len(slots)-1 of ``prefix`` (one prompt) go to ``slots``; raises before any change when a
        slot is busy or the pool cannot hold prompt + budget for every slot."""
        slots = [int(s) for s in slots]
        G = int(prefix.tokens.shape[1])
        if prefix.tokens.shape[0] != 1:
            raise SamplerError(
                f"bulk_insert: expected a one-prompt prefix, got {prefix.tokens.shape[0]} prompts"
            )
        if not slots or len(slots) > G or len(set(slots)) != len(slots):
            raise SamplerError(
                f"bulk_insert: need 1..{G} distinct slots (num_samples of the prefill), got {slots}"
            )
        for s in slots:
            if not 0 <= s < self.scfg.max_slots:
                raise SamplerError(f"bulk_insert: slot {s} outside [0, {self.scfg.max_slots})")
            if s in self._slot_pages:
                raise PoolExhaustedError(f"bulk_insert: slot {s} is in use; free_resource it first")
        budgets = [max_new_tokens] * len(slots) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        plen = int(prefix.true_lengths[0])  # host value known to the caller already; one scalar fetch
        budgets = [
            validate_budget(plen, b, self.scfg, f"bulk_insert slot {s}")
            for s, b in zip(slots, budgets, strict=True)
        ]
        (grp,) = allocate_groups(self.allocator, [plen], [budgets], self.scfg.page_size)
        arrays = build_page_arrays(
            [grp],
            1,
            prefix.k.shape[2] // self.scfg.page_size,
            len(slots),
            self.table_width,
            self.scfg.num_pages,
            self.scfg.max_slots,
            slots,
        )
        try:
            state = _insert_jit(
                prefix, decode_state, InsertArrays.from_host(arrays), self.scfg.eos_ids, self.kv_shard
            )
        except Exception:
            grp.release(self.allocator)
            raise
        for i, s in enumerate(slots):
            self._slot_pages[s] = grp.table(i)
        return state

    def generate(self, params: Params, decode_state: DecodeState) -> tuple[DecodeState, ResultTokens]:
        s = self.scfg
        return _generate_jit(
            params,
            self.cfg,
            decode_state,
            s.sampling,
            s.eos_ids,
            self.chunk_pages,
            s.pad_id,
            self.kv_shard,
            self.dynamic_chunks,
            attention_kernel=self.attention_kernel,
        )

    def free_resource(self, slot: int, decode_state: DecodeState | None = None) -> DecodeState | None:
        """Return the slot's pages to the pool. With ``decode_state``, also mark the slot inactive and return
        the new state; without it the caller guarantees the slot has finished (EOS / budget)."""
        pages = self._slot_pages.pop(int(slot), None)
        if pages is not None:
            self.allocator.release(pages)
        if decode_state is None:
            return None
        return decode_state._replace(active=decode_state.active.at[slot].set(False))
