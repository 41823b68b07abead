"""JAX's Mosaic ragged paged-attention kernel (``jax.experimental.pallas.ops.tpu.ragged_paged_attention``) over
our KV pool, returning the partial softmax state for exact merging.

The kernel body is JAX's own ``ragged_paged_attention_kernel``. Its public wrapper returns only the normalised
output; this module builds the same ``pallas_call`` with the kernel's running max / normaliser (VMEM scratch
there) as outputs, so each part of a context (a group's shared prefix, a sample's own pages, the new token)
can be attended separately and merged exactly (``paged_attention.merge``). For each row r, KV head h and
query j of that head's group, over the keys t < lengths[r] of the row's pages:

  m = max_t s_t,   l = sum_t e^{s_t - m},   acc = sum_t e^{s_t - m} v_t,   s_t = q_j . k_t / sqrt(hd)

Layout (``TPU_POOL``): the kernel reads K and V of a page in one DMA from ``[pages, page_size, 2 * Hkv, hd]``
with K of head h at 2h and V at 2h + 1. The pool is ``[L, N, page, 2 * Hkv, hd]`` (one array; the decode
state's ``v_pages`` is then an empty placeholder) viewed as L * N pages, so layer l's page p is l * N + p and
the layer index is folded into the page table. Every row is one decode sequence (one query token with Hq
heads); rows with no keys are returned as empty states (m = -1e30, l = 0). Off a TPU it runs in Pallas TPU
interpret mode (tests). Block sizes must be given when compiling without a TPU attached (the kernel's tuned
table reads the local device); see ``scale.md``-style compile-only use in tests/test_attention_kernels.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import (
    DEFAULT_MASK_VALUE,
    get_min_heads_per_blk,
    ragged_paged_attention_kernel,
)

Carry = tuple[jax.Array, jax.Array, jax.Array]
_NEG_INF = -1e30


def _kernel(*refs: pl.Ref, sm_scale: float) -> None:
    """JAX's kernel with (o, l, m) as outputs: reorder our refs into its (..., o, bufs, sems, l, m, acc)."""
    *prefetch, q_ref, kv_ref, o_ref, l_ref, m_ref, bufs, sems, acc_ref = refs
    ragged_paged_attention_kernel(
        *prefetch, q_ref, kv_ref, o_ref, bufs, sems, l_ref, m_ref, acc_ref,
        sm_scale=sm_scale, mask_value=DEFAULT_MASK_VALUE,
    )


def paged_partial(
    q: jax.Array,
    kv_pages: jax.Array,
    layer: jax.Array,
    table: jax.Array,
    lengths: jax.Array,
    *,
    interpret: bool = False,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
) -> Carry:
    """Partial softmax state (m, l, acc), f32 [Hkv, R, Gq(, hd)], of queries q [Hkv, R, Gq, hd] over the
    first lengths[r] tokens held by pages table[r] [R, P] of layer ``layer`` of the fused pool
    ``kv_pages [L, N, page, 2 * Hkv, hd]`` (module docstring)."""
    Hkv, R, Gq, hd = q.shape
    L, N, page, C, _ = kv_pages.shape
    if C != 2 * Hkv:
        raise ValueError(f"pallas_tpu attention: pool has {C} combined heads for {Hkv} KV heads")
    P = table.shape[1]
    Hq = Hkv * Gq
    bkv = min(P, num_kv_pages_per_block or 16)
    # rows per block: the kernel keeps (bq * Gq, 128) f32 running max / normaliser blocks in VMEM, so a
    # shared-prefix call (Gq = heads per KV head x G samples, e.g. 36) takes fewer rows than a per-sample one
    default_bq = 32 if 32 * Gq <= 256 else max(8, (256 // Gq) // 8 * 8)
    bq = min(num_queries_per_block or default_bq, -(-R // 8) * 8)
    R_pad = -(-R // bq) * bq
    qs = q.transpose(1, 0, 2, 3).reshape(R, Hq, hd).astype(kv_pages.dtype)
    qs = jnp.pad(qs, ((0, R_pad - R), (0, 0), (0, 0)))
    kv_lens = jnp.pad(lengths.astype(jnp.int32), (0, R_pad - R))
    pages = jnp.pad(table.astype(jnp.int32) + layer * N, ((0, R_pad - R), (0, 0)))
    cu_q_lens = jnp.arange(R_pad + 1, dtype=jnp.int32)
    num_seqs = jnp.array([R], jnp.int32)

    hq_blk, c_blk = get_min_heads_per_blk(Hq, C, qs.dtype, kv_pages.dtype)
    kvh_blk = c_blk // 2
    heads_blks, q_blks = Hq // hq_blk, R_pad // bq
    q_spec = pl.BlockSpec((bq, hq_blk, hd), lambda h, i, *_: (i, h, 0))
    lm_shape = (kvh_blk, bq * Gq, 128)  # the kernel's per-block running max / normaliser (128 lanes)
    lm_spec = pl.BlockSpec((None, None, *lm_shape), lambda h, i, *_: (h, i, 0, 0, 0))
    prefetch = (kv_lens, pages, cu_q_lens, jnp.array((0, 0), jnp.int32), num_seqs)
    call = pl.pallas_call(
        functools.partial(_kernel, sm_scale=hd**-0.5),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[q_spec, lm_spec, lm_spec],
            grid=(heads_blks, q_blks),
            scratch_shapes=[
                pltpu.VMEM((2, bkv, page, c_blk, hd), kv_pages.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((bq, hq_blk, hd), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
        ),
        out_shape=[
            jax.ShapeDtypeStruct((R_pad, Hq, hd), qs.dtype),
            jax.ShapeDtypeStruct((heads_blks, q_blks, *lm_shape), jnp.float32),
            jax.ShapeDtypeStruct((heads_blks, q_blks, *lm_shape), jnp.float32),
        ],
        interpret=pltpu.InterpretParams() if interpret else False,
        name="poer_ragged_paged_attention",
    )
    o, l, m = call(*prefetch, qs, kv_pages.reshape(L * N, page, C, hd))

    def per_head(x: jax.Array) -> jax.Array:  # [heads_blks, q_blks, kvh_blk, bq * Gq] -> [Hkv, R, Gq]
        x = x.reshape(heads_blks, q_blks, kvh_blk, bq, Gq).transpose(0, 2, 1, 3, 4)
        return x.reshape(Hkv, R_pad, Gq)[:, :R]

    has_keys = (lengths > 0)[None, :, None]
    m = jnp.where(has_keys, per_head(m[..., 0]), _NEG_INF)
    l = jnp.where(has_keys, per_head(l[..., 0]), 0.0)
    o = o[:R].astype(jnp.float32).reshape(R, Hkv, Gq, hd).transpose(1, 0, 2, 3)
    return m, l, jnp.where(has_keys[..., None], o * l[..., None], 0.0)
