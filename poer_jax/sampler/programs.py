"""The sampler's compiled programs for the plan command, at the worst-case shapes of a config (abstract).

``sampler_program_specs`` returns the two jitted programs ``GroupSampler.generate`` runs (``sharded.py``):
'sampler/prefill' (prefill + insert of one call's worth of groups on every device) and 'sampler/decode'
(one decode segment), with ``jax.ShapeDtypeStruct`` arguments carrying the shardings the sampler gives them
on ``mesh``: weights in the decode layout and compute dtype, the KV pool split over the batch axes
(``scfg.num_pages`` pages per device), full decode rows (``max_slots`` per device), the longest prompt and
budget. Nothing is allocated; ``fn.lower(*args, **kwargs)`` compiles for whatever devices ``mesh`` holds
(host CPU devices, or a TPU topology).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.model.qwen import param_shapes
from poer_jax.model.sharding import decode_param_shardings
from poer_jax.program_spec import RESIDENT_KV_POOL, RESIDENT_SAMPLER_PARAMS, ProgramSpec
from poer_jax.sampler.engine import DecodeState, InsertArrays, unroll_decode_layers, unstack_layers
from poer_jax.sampler.packed_weights import abstract_packed, use_packed_matmuls
from poer_jax.sampler.paged_attention import (
    AttentionKernel,
    attention_chunk_pages,
    attention_kernel,
    dynamic_attention_chunks,
)
from poer_jax.sampler.pages import SamplerConfig, pow2_bucket, prefill_bucket, shape_bucket
from poer_jax.sampler.scheduler import CallShapes, call_shapes
from poer_jax.sampler.sharded import (
    PrefillBatch,
    SampleBuffers,
    SegmentControl,
    SlotState,
    batch_shards,
    decode_segment,
    decode_tail_rows,
    layer_shardings,
    pool_shapes,
    pool_shardings,
    prefill_insert,
    rows_sharding,
)

POOL_KEYS = ("rollout.kv_cache_gb", "rollout.kv_cache_fraction", "rollout.num_pages", "rollout.page_size")
SLOT_KEYS = ("data.questions_per_step", "rollout.group_size", "mesh.data", "mesh.fsdp")


def _ladder(limit: int, bucket: Any) -> int:
    """How many bucketed values sizes 1..limit fall into."""
    return len({bucket(n) for n in range(1, max(int(limit), 1) + 1)})


def sampler_program_specs(
    mcfg: QwenConfig,
    scfg: SamplerConfig,
    mesh: Mesh,
    *,
    group_size: int,
    prompt_len: int,
    max_new_tokens: int,
) -> list[ProgramSpec]:
    """'sampler/prefill' and 'sampler/decode' at the worst case of a call of groups of ``group_size``
    samples: every decode row of every device busy (``scfg.max_slots`` slots per device), prompts of
    ``prompt_len`` tokens (question + reused prefix), budgets of ``max_new_tokens``, the pool of
    ``scfg.num_pages`` pages per device.

    ``num_shapes`` is an upper bound on the programs a run compiles for this group size: the product of the
    bucket ladders of the dimensions that vary between calls (decode rows; with bucketed page tables, their
    widths; for prefill also the prompt length and prompts per call)."""
    G = int(group_size)
    page = scfg.page_size
    rows = max(1, scfg.max_slots // G)
    chunk = attention_chunk_pages(scfg, mesh)
    dynamic = dynamic_attention_chunks(scfg, mesh)
    offsets = sorted({int(prompt_len), max(1, min(int(prompt_len), page - 1))})  # worst partial-page offset
    fixed = scfg.fixed_tables and dynamic
    sh = call_shapes(offsets, [int(max_new_tokens)] * len(offsets), G, scfg, chunk, rows, rows, fixed)
    kv_dtype = dtype_from_name(scfg.kv_dtype or mcfg.dtype)
    D = batch_shards(mesh)
    kernel = attention_kernel(scfg, mesh)
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    args = _Abstract(mcfg, scfg, mesh, sh, D, kv_dtype, kernel)

    decode_shapes = _ladder(rows, shape_bucket)
    if not fixed:  # bucketed table widths vary with the call's longest prompt / budget
        decode_shapes *= _ladder(sh.table_width, shape_bucket) * _ladder(sh.shared_width, shape_bucket)
    prefill_shapes = (decode_shapes * _ladder(prompt_len, lambda n: prefill_bucket(n, page))
                      * _ladder(sh.prefill_rows, pow2_bucket))
    state, out = args.state(), args.buffers()
    where = f"D={D} devices x R={sh.rows} rows x G={G}"
    prefill = ProgramSpec(
        name="sampler/prefill",
        fn=prefill_insert,
        args=(args.params(), state, out, args.prefill_batch(), args.key()),
        kwargs=dict(cfg=mcfg, sp=scfg.sampling, group_size=G, eos_ids=scfg.eos_ids, kv_dtype=kv_dtype, mesh=mesh),
        sizing_keys=(*POOL_KEYS, "data.max_prompt_len", "rollout.max_completion_len", *SLOT_KEYS),
        num_shapes=prefill_shapes,
        note=f"{where}; N={sh.prefill_rows} prompts x T={sh.prefill_len} tokens per device; "
             f"{scfg.num_pages} pages per device",
        resident={RESIDENT_SAMPLER_PARAMS: 0, RESIDENT_KV_POOL: 1},
        dims={"devices": D, "prompts": sh.prefill_rows, "prompt_tokens": sh.prefill_len},
    )
    decode = ProgramSpec(
        name="sampler/decode",
        fn=decode_segment,
        args=(args.params(), state, out, args.control()),
        kwargs=dict(cfg=mcfg, sp=scfg.sampling, eos_ids=scfg.eos_ids, chunk_pages=sh.chunk_pages,
                    pad_id=scfg.pad_id, dynamic_chunks=dynamic, shared_chunk_pages=sh.shared_chunk_pages, mesh=mesh,
                    attention_kernel=kernel,
                    tail_rows=decode_tail_rows(scfg.tail_rows, platform, sh.rows)),
        sizing_keys=(*POOL_KEYS, "rollout.max_completion_len", "data.max_prompt_len", *SLOT_KEYS),
        num_shapes=decode_shapes,
        note=f"{where}; page tables {sh.shared_width} shared + {sh.table_width} private pages; "
             f"{scfg.num_pages} pages per device",
        resident={RESIDENT_SAMPLER_PARAMS: 0, RESIDENT_KV_POOL: 1},
        dims={"devices": D, "slots": sh.slots, "context_tokens": (sh.shared_width + sh.table_width) * page},
    )
    return [prefill, decode]


class _Abstract:
    """Abstract arguments of the sampler's programs, sharded as ``GroupSampler`` shards them."""

    def __init__(self, mcfg: QwenConfig, scfg: SamplerConfig, mesh: Mesh | None, sh: CallShapes, D: int,
                 kv_dtype: Any, kernel: AttentionKernel) -> None:
        self.mcfg, self.scfg, self.mesh, self.sh, self.D, self.kv_dtype = mcfg, scfg, mesh, sh, D, kv_dtype
        self.kernel = kernel

    def _rows(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        sharding = None if self.mesh is None else rows_sharding(self.mesh, len(shape))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def params(self) -> Any:
        """The weights as ``GroupSampler`` holds them: stacked, or per layer with the layers unrolled (CPU)."""
        shardings = None if self.mesh is None else decode_param_shardings(self.mcfg, self.mesh)
        shapes = param_shapes(self.mcfg)
        dt = self.mcfg.jnp_dtype
        if shardings is None:
            params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), shapes, is_leaf=lambda x: isinstance(x, tuple))
        else:
            params = jax.tree.map(lambda s, sd: jax.ShapeDtypeStruct(s, dt, sharding=sd), shapes, shardings,
                                  is_leaf=lambda x: isinstance(x, tuple))
        if not unroll_decode_layers(self.scfg, self.mesh):
            return params
        per_layer = jax.eval_shape(partial(unstack_layers, cfg=self.mcfg), params)
        per_layer_sh = None if shardings is None else layer_shardings(shardings, self.mcfg)
        if per_layer_sh is not None:
            per_layer = jax.tree.map(lambda a, sd: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sd), per_layer,
                                     per_layer_sh)
        if use_packed_matmuls(self.scfg, self.mcfg, self.mesh, True):
            return abstract_packed(per_layer, self.mcfg, per_layer_sh)
        return per_layer

    def key(self) -> jax.ShapeDtypeStruct:
        key = jax.eval_shape(lambda: jax.random.key(0))
        sharding = None if self.mesh is None else NamedSharding(self.mesh, P())
        return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding)

    def state(self) -> SlotState:
        c, s, sh, D = self.mcfg, self.scfg, self.sh, self.D
        S, R = D * sh.slots, D * sh.rows
        places = (None, None) if self.mesh is None else pool_shardings(c, self.mesh, self.kernel)
        k, v = (jax.ShapeDtypeStruct(shape, self.kv_dtype, sharding=sd)
                for shape, sd in zip(pool_shapes(c, s, D, self.kernel), places, strict=True))
        i32, r = jnp.int32, self._rows
        dec = DecodeState(k, v, r((S, sh.table_width), i32), r((S,), i32), r((S,), i32), r((S,), i32),
                          r((S,), i32), r((S,), jnp.bool_), r((S,), i32), r((S, 2), jnp.uint32))
        return SlotState(dec, r((R, sh.shared_width), i32), r((R,), i32), r((S,), i32))

    def buffers(self) -> SampleBuffers:
        n, M, r = self.D * self.sh.out_groups * self.sh.group_size, self.sh.out_width, self._rows
        return SampleBuffers(r((n, M), jnp.int32), r((n, M), jnp.float32), r((n, M), jnp.float32),
                             r((n,), jnp.int32), r((n,), jnp.int32))

    def prefill_batch(self) -> PrefillBatch:
        sh, D, r, i32 = self.sh, self.D, self._rows, jnp.int32
        N, E = D * sh.prefill_rows, D * sh.prefill_rows * sh.group_size
        ins = InsertArrays(r((N, sh.prefill_len // self.scfg.page_size), i32), r((E,), i32),
                           r((E, sh.table_width), i32), r((E,), i32), r((E,), i32), r((E,), i32), r((E,), i32))
        return PrefillBatch(r((N, sh.prefill_len), i32), r((N,), i32), r((N,), jnp.uint32), r((N,), i32),
                            r((N, sh.shared_width), i32), r((N,), i32), ins, r((E,), i32))

    def control(self) -> SegmentControl:
        sh, D, r, i32 = self.sh, self.D, self._rows, jnp.int32
        target = jax.ShapeDtypeStruct((), i32, sharding=None if self.mesh is None else NamedSharding(self.mesh, P()))
        return SegmentControl(r((D,), i32), r((D,), i32), r((D,), i32), r((D * sh.slots,), i32),
                              r((D * sh.rows,), i32), target)
