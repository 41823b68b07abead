"""JAX's Triton paged-attention kernel (``jax.experimental.pallas.ops.gpu.paged_attention``) over our KV pool.

The kernel body is JAX's own ``paged_attention_kernel``; this module only lays our pool out for it and keeps
the partial softmax state it computes, so a part of the context attended here can be merged exactly with other
parts (the new token, a group's shared prefix; see ``paged_attention.merge``). For each (row r, KV head h)
and query j of that head's group it returns, over the keys t < lengths[r] of the row's pages,

  m = max_t s_t,   l = sum_t e^{s_t - m},   acc = sum_t e^{s_t - m} v_t,   s_t = q_j . k_t / sqrt(hd)

Layout: the pool ``[L, Hkv, N, page, hd]`` is viewed (a free reshape) as one head of L * Hkv * N pages; page p
of layer l, KV head h is page (l * Hkv + h) * N + p there, so the layer index (traced inside the layer scan) is
folded into the page table instead of slicing the pool. Each (row, KV head) pair is one sequence of the
kernel's batch with that head's Hq / Hkv queries (padded to the kernel's block of 16).
The kernel applies no 1/sqrt(hd): q is pre-scaled. Off a GPU it runs in Pallas interpret mode (tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.gpu.paged_attention import DEFAULT_MASK_VALUE, paged_attention_kernel

Carry = tuple[jax.Array, jax.Array, jax.Array]
BLOCK_H = 16  # the kernel's query-row block: a multiple of 16 (Triton dot tile)


def _split(pages: int, k_splits: int | None, per_block: int | None) -> tuple[int, int]:
    """(k_splits, pages per compute block): splits divide the table width, blocks divide a split."""
    ks = k_splits or math.gcd(pages, 16)
    if pages % ks:
        raise ValueError(f"pallas_gpu attention: k_splits {ks} does not divide the table width {pages}")
    ppb = per_block or math.gcd(pages // ks, 8)
    if (pages // ks) % ppb:
        raise ValueError(f"pallas_gpu attention: {ppb} pages per block do not divide {pages // ks} per split")
    return ks, ppb


def paged_partial(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    table: jax.Array,
    lengths: jax.Array,
    *,
    interpret: bool = False,
    k_splits: int | None = None,
    pages_per_compute_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Carry:
    """Partial softmax state (m, l, acc), f32 [Hkv, R, Gq(, hd)], of queries q [Hkv, R, Gq, hd] over the
    first lengths[r] tokens held by pages table[r] [R, P] of layer ``layer`` of the pool (module docstring)."""
    Hkv, R, Gq, hd = q.shape
    L, _, N, page, _ = k_pages.shape
    P = table.shape[1]
    ks, ppb = _split(P, k_splits, pages_per_compute_block)
    bh = -(-Gq // BLOCK_H) * BLOCK_H
    total = L * Hkv * N
    kp = k_pages.reshape(1, total, page, hd)
    vp = v_pages.reshape(1, total, page, hd)
    offsets = (layer * Hkv + jnp.arange(Hkv, dtype=jnp.int32)) * N
    tables = (table[None].astype(jnp.int32) + offsets[:, None, None]).reshape(Hkv * R, ks, P // ks)
    lens = jnp.broadcast_to(lengths.astype(jnp.int32)[None], (Hkv, R)).reshape(Hkv * R, 1)
    qs = (q.astype(jnp.float32) * hd**-0.5).astype(k_pages.dtype).reshape(Hkv * R, 1, Gq, hd)
    qs = jnp.pad(qs, ((0, 0), (0, 0), (0, bh - Gq), (0, 0)))

    kernel = functools.partial(
        paged_attention_kernel,
        num_heads=Gq,
        pages_per_compute_block=ppb,
        mask_value=DEFAULT_MASK_VALUE,
        attn_logits_soft_cap=None,
    )
    call = pl.pallas_call(
        kernel,
        grid=(1, bh // BLOCK_H, ks),
        in_specs=[
            pl.BlockSpec((None, BLOCK_H, hd), lambda h, i, k: (h, i, 0)),
            pl.BlockSpec((None, total, page, hd), lambda h, i, k: (h, 0, 0, 0)),
            None,
            pl.BlockSpec((None, total, page, hd), lambda h, i, k: (h, 0, 0, 0)),
            None,
            pl.BlockSpec((None, P // ks), lambda h, i, k: (k, 0)),
            pl.BlockSpec((1,), lambda h, i, k: (0,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, BLOCK_H, hd), lambda h, i, k: (k, h, i, 0)),
            pl.BlockSpec((None, None, BLOCK_H), lambda h, i, k: (k, h, i)),
            pl.BlockSpec((None, None, BLOCK_H), lambda h, i, k: (k, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((ks, 1, bh, hd), jnp.float32),
            jax.ShapeDtypeStruct((ks, 1, bh), jnp.float32),
            jax.ShapeDtypeStruct((ks, 1, bh), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="poer_paged_attention",
    )

    def one(qr: jax.Array, tr: jax.Array, nr: jax.Array) -> list[jax.Array]:
        return call(qr, kp, None, vp, None, tr, nr)

    o, l, m = jax.vmap(one)(qs, tables, lens)  # [Hkv*R, ks, 1, bh(, hd)]
    o, l, m = o[:, :, 0, :Gq], l[:, :, 0, :Gq], m[:, :, 0, :Gq]
    # the splits' states, merged exactly (a split past the row's length has l = 0, o = 0)
    m_all = jnp.max(m, axis=1)
    c = jnp.exp(m - m_all[:, None])
    l_all = jnp.sum(l * c, axis=1)
    acc = jnp.sum(o * c[..., None], axis=1)
    return m_all.reshape(Hkv, R, Gq), l_all.reshape(Hkv, R, Gq), acc.reshape(Hkv, R, Gq, hd)
