"""Attention over a paged KV cache and the page writes, in plain JAX (CPU, GPU and TPU alike).

Pool layout: ``k_pages / v_pages [L, Hkv, num_pages, page_size, hd]`` (keys stored after RoPE, as the
model's ``attention_inputs`` returns them). A sequence's token at position t lives in page
``table[t // page_size]`` at offset ``t % page_size``. KV heads come before pages so that a gathered chunk is
already [Hkv, B, tokens, hd], the operand layout of a batched matmul over (head, sequence): the KV bytes read
per step are never transposed.

Decode attention for one new token per sequence (query position = ``lengths[b]``, the cached token count):

  out_b = sum_{t <= len_b} softmax_t(q_b . k_t / sqrt(hd)) v_t,   (k, v)_{len_b} = the new token's own k, v

computed as an online (streaming) softmax over chunks of ``chunk_pages`` pages: running max m, normaliser l
and accumulator a start from the new token's own score, and each chunk updates
  m' = max(m, max_t s_t);  l' = l e^{m - m'} + sum_t e^{s_t - m'};  a' = a e^{m - m'} + sum_t e^{s_t - m'} v_t
The loop runs ceil(max_b len_b / (chunk_pages * page_size)) times, a count decided on device, so attention
reads only the pages that hold tokens (up to the longest sequence of the batch) and never materialises the
whole table (on GPU a fixed count over the whole table is used instead, see ``dynamic_chunks``).
GQA: query head h reads KV head h // (Hq / Hkv). Scores and softmax are float32, as in the model's
``dense_attention``. With a ``SharedPrefix`` (cascade attention) a group's common prompt pages are read once
for all its samples.

Kernels (``AttentionKernel``; ``SamplerConfig.attention_kernel``): 'xla' is the code below (any backend, the
reference); 'pallas_gpu' attends the pages with JAX's Triton paged-attention kernel (pallas_gpu.py),
'pallas_tpu' with JAX's Mosaic ragged paged-attention kernel (pallas_tpu.py). Each part of the context (the
new token, the group's shared prefix, the sample's own pages) yields a partial softmax state (m, l, a), and
the parts are merged exactly (``merge``), whichever computed them. The TPU kernel reads K and V of a page
from one array, so with it the pool is one fused array ``[L, N, page, 2 * Hkv, hd]`` (K of head h at 2h, V
at 2h + 1) held in ``k_pages``, and ``v_pages`` is an empty placeholder (``pool_shapes``). On TPUs the xla
kernel also reads one fused array, page-minor: ``[L, N, Hkv, 2, page, hd]`` (K of head h at [h, 0], V at
[h, 1]), written a whole page at a time (``attention_kernel`` says why). The writes below handle all three.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig
from poer_jax.model.sharding import BATCH_AXES
from poer_jax.sampler import pallas_gpu, pallas_tpu
from poer_jax.sampler.pages import SamplerConfig, SamplerError

_NEG_INF = -1e30
Carry = tuple[jax.Array, jax.Array, jax.Array]  # running max m, normaliser l, accumulator a


class AttentionKernel(NamedTuple):
    """Which code attends the pages (a static argument of the decode programs).

    name: 'xla' | 'pallas_gpu' | 'pallas_tpu' (module docstring). interpret: run a Pallas kernel in interpret
    mode (a kernel chosen for another platform than the one it runs on: CPU tests). fused: the 'xla' kernel
    reads its fused, page-minor pool [L, N, Hkv, 2, page, hd] (``SamplerConfig.kv_layout``; on TPUs by default,
    see ``attention_kernel``)."""

    name: str = "xla"
    interpret: bool = False
    fused: bool = False

    @property
    def fused_pool(self) -> bool:
        """The pool is one K/V array: [L, N, page, 2 Hkv, hd] (the TPU kernel's), or with ``fused`` the xla
        kernel's [L, N, Hkv, 2, page, hd]."""
        return self.name == "pallas_tpu" or self.fused


XLA = AttentionKernel()


def merge(a: Carry, b: Carry) -> Carry:
    """Exact merge of two partial softmax states over disjoint key sets:
    m = max(m1, m2), l = l1 e^{m1 - m} + l2 e^{m2 - m}, a = a1 e^{m1 - m} + a2 e^{m2 - m}."""
    m = jnp.maximum(a[0], b[0])
    c1, c2 = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * c1 + b[1] * c2, a[2] * c1[..., None] + b[2] * c2[..., None]


class SharedPrefix(NamedTuple):
    """Group-level prefix pages for cascade attention (rows of the batch = G consecutive samples per group).

    table [Ng, Ps]: the group's full prompt pages; lengths [Ng]: tokens in them (a multiple of page_size).
    With it, ``page_table`` rows hold only each sample's private pages, starting at position lengths[g].
    """

    table: jax.Array
    lengths: jax.Array


def _accumulate(
    qg: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    table: jax.Array,
    start: jax.Array,
    lengths: jax.Array,
    chunk_pages: int,
    dynamic_chunks: bool,
    carry: Carry,
) -> Carry:
    """Online-softmax update of ``carry`` [Hkv, R, Gq(, hd)] with the keys of each row r's pages: page j of
    ``table[r]`` holds positions start[r] + j * page .. + page - 1, of which those < lengths[r] are valid.
    Split pools [L, Hkv, N, page, hd], or the page-minor pool [L, N, Hkv, 2, page, hd] in ``k_pages``
    (``v_pages`` empty): there a chunk is one gather of whole pages, all heads, K and V together."""
    Hkv, R, _, hd = qg.shape
    page_minor = is_page_minor(k_pages, v_pages)
    page = k_pages.shape[4] if page_minor else k_pages.shape[3]
    P = table.shape[1]
    if P % chunk_pages:
        raise ValueError(f"paged attention: table width {P} is not a multiple of chunk_pages {chunk_pages}")
    span = chunk_pages * page
    offsets = jnp.arange(span, dtype=jnp.int32)
    heads = jnp.arange(Hkv, dtype=jnp.int32)[:, None, None]
    scale = hd**-0.5

    def chunk(c: jax.Array, carry: Carry) -> Carry:
        m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(table, c * chunk_pages, chunk_pages, axis=1)  # [R, C]
        if page_minor:  # [R, C, Hkv, 2, page, hd] -> [R, C, Hkv, page, hd] each, read as is
            kv = k_pages[layer, pages]
            k, v = kv[:, :, :, 0], kv[:, :, :, 1]
            s = jnp.einsum("krgd,rckpd->krgcp", qg, k, preferred_element_type=jnp.float32)
            s = s.reshape(*s.shape[:3], span) * scale  # (chunk page, offset) = the chunk's span
        else:
            k = k_pages[layer, heads, pages[None]].reshape(Hkv, R, span, hd)  # one gather of whole pages
            v = v_pages[layer, heads, pages[None]].reshape(Hkv, R, span, hd)
            s = jnp.einsum("krgd,krsd->krgs", qg, k, preferred_element_type=jnp.float32) * scale
        valid = (start[:, None] + c * span + offsets[None, :] < lengths[:, None])[None, :, None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, _NEG_INF), axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[..., None]), 0.0)  # explicit zeros: m may still be -inf-like
        l = l * corr + jnp.sum(p, axis=-1)
        if page_minor:
            pv = jnp.einsum("krgcp,rckpd->krgd", p.reshape(*p.shape[:3], chunk_pages, page).astype(v.dtype), v,
                            preferred_element_type=jnp.float32)
        else:
            pv = jnp.einsum("krgs,krsd->krgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    if P == chunk_pages:
        return chunk(jnp.int32(0), carry)
    if dynamic_chunks:
        n_chunks = jnp.minimum((jnp.max(lengths - start) + span - 1) // span, P // chunk_pages)
        return jax.lax.fori_loop(0, n_chunks, chunk, carry)
    return jax.lax.fori_loop(0, P // chunk_pages, chunk, carry)


def _part(
    kernel: AttentionKernel,
    qg: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    table: jax.Array,
    start: jax.Array,
    lengths: jax.Array,
    chunk_pages: int,
    dynamic_chunks: bool,
    carry: Carry,
) -> Carry:
    """``carry`` merged with the attention of qg [Hkv, R, Gq, hd] over each row's pages (positions start[r]
    onwards, those < lengths[r] valid), by the chosen kernel."""
    if kernel.name == "xla":
        if kernel.fused != is_page_minor(k_pages, v_pages) or (not kernel.fused and v_pages.size == 0):
            raise SamplerError(f"paged attention: {kernel} does not read a pool of shapes {k_pages.shape} and "
                               f"{v_pages.shape}")
        return _accumulate(qg, k_pages, v_pages, layer, table, start, lengths, chunk_pages, dynamic_chunks, carry)
    held = jnp.maximum(lengths - start, 0)
    if kernel.name == "pallas_gpu":
        part = pallas_gpu.paged_partial(qg, k_pages, v_pages, layer, table, held, interpret=kernel.interpret)
    elif kernel.name == "pallas_tpu":
        part = pallas_tpu.paged_partial(qg, k_pages, layer, table, held, interpret=kernel.interpret)
    else:
        raise SamplerError(f"paged attention: unknown kernel {kernel.name!r}")
    return merge(carry, part)


def paged_decode_attention(
    q: jax.Array,
    k_cur: jax.Array,
    v_cur: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    chunk_pages: int,
    dynamic_chunks: bool = True,
    shared: SharedPrefix | None = None,
    shared_chunk_pages: int = 1,
    kernel: AttentionKernel = XLA,
) -> jax.Array:
    """One-token attention over cached pages plus the token itself.

    q [B, Hq, hd]; k_cur/v_cur [B, Hkv, hd] (the new token, not yet in the pool); k_pages/v_pages
    [L, Hkv, N, page, hd] (or the fused layout, see the module docstring); layer: scalar index into L;
    page_table [B, P] with P a multiple of ``chunk_pages``; lengths [B] cached tokens per sequence. Returns
    [B, Hq, hd] in q's dtype.

    ``shared`` (cascade attention): rows are groups of G = B / Ng consecutive samples; each group's prefix
    pages are read once and attended by all G samples' queries together (G x Hq / Hkv query rows per KV head),
    the private pages per sample, and the partial softmaxes are merged exactly (``merge``).

    ``dynamic_chunks`` (xla kernel): stop after the chunks that hold tokens (a data-dependent trip count: right
    on CPU and TPU); otherwise read every chunk of the table with a fixed trip count, which XLA:GPU runs
    without the per-iteration host round trip of a data-dependent while loop. ``kernel``: ``AttentionKernel``.
    """
    B, Hq, hd = q.shape
    Hkv = k_cur.shape[1]
    Gq = Hq // Hkv
    qg = q.reshape(B, Hkv, Gq, hd).transpose(1, 0, 2, 3)  # [Hkv, B, Gq, hd]

    s_cur = jnp.einsum("kbgd,bkd->kbg", qg, k_cur, preferred_element_type=jnp.float32) * hd**-0.5
    acc0 = jnp.broadcast_to(v_cur.astype(jnp.float32).transpose(1, 0, 2)[:, :, None, :], qg.shape)
    carry: Carry = (s_cur, jnp.ones_like(s_cur), acc0)
    start = jnp.zeros((B,), jnp.int32)
    if shared is not None:
        Ng = shared.table.shape[0]
        G = B // Ng
        qs = qg.reshape(Hkv, Ng, G * Gq, hd)  # slot g * G + i -> row g, query (i, head)
        empty: Carry = (
            jnp.full((Hkv, Ng, G * Gq), _NEG_INF, jnp.float32),
            jnp.zeros((Hkv, Ng, G * Gq), jnp.float32),
            jnp.zeros((Hkv, Ng, G * Gq, hd), jnp.float32),
        )
        zeros = jnp.zeros((Ng,), jnp.int32)
        m1, l1, a1 = _part(
            kernel, qs, k_pages, v_pages, layer, shared.table, zeros, shared.lengths, shared_chunk_pages,
            dynamic_chunks, empty,
        )
        carry = merge((m1.reshape(Hkv, B, Gq), l1.reshape(Hkv, B, Gq), a1.reshape(Hkv, B, Gq, hd)), carry)
        start = jnp.repeat(shared.lengths, G)
    _, l, acc = _part(
        kernel, qg, k_pages, v_pages, layer, page_table, start, lengths, chunk_pages, dynamic_chunks, carry
    )
    return (acc / l[..., None]).transpose(1, 0, 2, 3).reshape(B, Hq, hd).astype(q.dtype)


def is_fused(k_pages: jax.Array, v_pages: jax.Array) -> bool:
    """The pool is one K/V array in ``k_pages`` (``v_pages`` an empty placeholder): the TPU kernel's
    [L, N, page, 2 Hkv, hd] or the xla kernel's page-minor [L, N, Hkv, 2, page, hd] (``is_page_minor``)."""
    return v_pages.size == 0 and k_pages.ndim in (5, 6)


def is_page_minor(k_pages: jax.Array, v_pages: jax.Array) -> bool:
    """The xla kernel's fused pool [L, N, Hkv, 2, page, hd]: K at [.., h, 0, ..], V at [.., h, 1, ..]."""
    return v_pages.size == 0 and k_pages.ndim == 6


def _interleave(k: jax.Array, v: jax.Array, axis: int) -> jax.Array:
    """[..., Hkv, hd] k and v -> [..., 2 * Hkv, hd] with k of head h at 2h and v at 2h + 1 (Hkv at ``axis``)."""
    kv = jnp.stack([k, v], axis=axis + 1)
    return kv.reshape(*kv.shape[:axis], 2 * k.shape[axis], *kv.shape[axis + 2 :])


def write_decode_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    active: jax.Array,
    start: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Store each active sequence's new k/v [L, Hkv, B, hd] at its position [B]; inactive rows write nothing.

    ``start`` [B]: position of each table's first page (the shared prefix length in cascade mode; 0 else).
    Inactive rows are pointed past the pool (page id = num_pages) and dropped, so a finished sequence can
    never touch a page it shares with others.
    """
    fused = is_fused(k_pages, v_pages)
    N, page = (k_pages.shape[1], k_pages.shape[-2 if k_pages.ndim == 6 else 2]) if fused else \
        (k_pages.shape[2], k_pages.shape[3])
    rel = positions if start is None else positions - start
    idx = jnp.clip(rel // page, 0, page_table.shape[1] - 1)
    dest = jnp.where(active, jnp.take_along_axis(page_table, idx[:, None], axis=1)[:, 0], N)
    off = positions % page
    if is_page_minor(k_pages, v_pages):  # [L, Hkv, B, hd] into [L, N, Hkv, 2, page, hd], whole pages
        # Each row's last page is read, its token set and the page written back: the scatter's window, a whole
        # page (Hkv, 2, page, hd), is then the pool's minor dimensions, as the page gathers' and the prefill's are,
        # so XLA:TPU keeps the pool in one layout (a one-token window wants (Hkv, hd) minor: a pool copy per step).
        # A row writes only its own last page (copy on write), so whole-page writes never collide.
        kv = jnp.stack([k_new, v_new], axis=2).transpose(0, 3, 1, 2, 4).astype(k_pages.dtype)  # [L, B, Hkv, 2, hd]
        cur = k_pages[:, jnp.minimum(dest, N - 1)]  # [L, B, Hkv, 2, page, hd]
        hit = (jnp.arange(page) == off[:, None])[None, :, None, None, :, None]
        return k_pages.at[:, dest].set(jnp.where(hit, kv[:, :, :, :, None], cur), mode="drop"), v_pages
    if fused:  # [L, B, 2 * Hkv, hd] into [L, N, page, 2 * Hkv, hd]
        kv = _interleave(k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3), axis=2)
        return k_pages.at[:, dest, off].set(kv.astype(k_pages.dtype), mode="drop"), v_pages
    k_pages = k_pages.at[:, :, dest, off].set(k_new.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[:, :, dest, off].set(v_new.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def write_prefill_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    true_lengths: jax.Array,
    shared_dest: jax.Array,
    entry_prefix: jax.Array,
    partial_dest: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Copy prefilled KV [L, N, T, Hkv, hd] (T a multiple of page_size) into the pool.

    Full prompt pages go once to ``shared_dest [N, T/page]`` (shared by the whole group); the partial last
    page of prompt ``entry_prefix[e]`` is copied to each entry's own ``partial_dest[e]`` (copy on write).
    Out-of-range destinations are dropped. Slots past a prompt's end in the copied page hold padding KV:
    masked by length until the sample's own tokens overwrite them.
    """
    L, N, T, Hkv, hd = k.shape
    fused = is_fused(k_pages, v_pages)
    page = k_pages.shape[-2 if k_pages.ndim == 6 else 2] if fused else k_pages.shape[3]
    J = T // page
    flat = shared_dest.reshape(N * J)
    src = entry_prefix * J + jnp.minimum(true_lengths[entry_prefix] // page, J - 1)  # [M] page of the copy
    if is_page_minor(k_pages, v_pages):  # to [L, N*J, Hkv, 2, page, hd]
        kvp = jnp.stack([k, v], axis=4).reshape(L, N * J, page, Hkv, 2, hd).transpose(0, 1, 3, 4, 2, 5)
        kvp = kvp.astype(k_pages.dtype)
        k_pages = k_pages.at[:, flat].set(kvp, mode="drop")
        return k_pages.at[:, partial_dest].set(kvp[:, src], mode="drop"), v_pages
    if fused:  # to [L, N*J, page, 2 * Hkv, hd]
        kvp = _interleave(k, v, axis=3).reshape(L, N * J, page, 2 * Hkv, hd).astype(k_pages.dtype)
        # One scatter for the shared pages and the partial copies (their destinations are disjoint: a partial copy
        # goes to the entry's own page). As two scatters, XLA:TPU gave the second, whose updates are a gather of
        # the first's, its own pool layout, and copied the whole pool to it and back in every insert call (the 1.5B
        # on a v5p-1: 10.3 GB of temporaries next to a 10.3 GB pool; docs/gpu-plan.md).
        dest = jnp.concatenate([flat, partial_dest])
        return k_pages.at[:, dest].set(jnp.concatenate([kvp, kvp[:, src]], axis=1), mode="drop"), v_pages
    # to the pool layout [L, Hkv, N*J, page, hd]
    kp = k.reshape(L, N * J, page, Hkv, hd).transpose(0, 3, 1, 2, 4).astype(k_pages.dtype)
    vp = v.reshape(L, N * J, page, Hkv, hd).transpose(0, 3, 1, 2, 4).astype(v_pages.dtype)
    k_pages = k_pages.at[:, :, flat].set(kp, mode="drop")
    v_pages = v_pages.at[:, :, flat].set(vp, mode="drop")
    k_pages = k_pages.at[:, :, partial_dest].set(kp[:, :, src], mode="drop")
    v_pages = v_pages.at[:, :, partial_dest].set(vp[:, :, src], mode="drop")
    return k_pages, v_pages


# ---- pool layout and attention settings ----------------------------------------------------------------
def _platform(mesh: Mesh | None) -> str:
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def attention_kernel(scfg: SamplerConfig, mesh: Mesh | None) -> AttentionKernel:
    """``SamplerConfig.attention_kernel`` resolved for the devices: 'auto' is pallas_gpu on NVIDIA GPUs,
    pallas_tpu on TPUs and xla elsewhere; a Pallas kernel named for another platform runs interpreted.

    XLA cannot partition a Pallas kernel: the sampler runs it per device inside its shard_map, manual over
    every mesh axis only when the non-batch axes (``tensor``) have size 1 (``sharded.manual_axes``). With
    ``tensor`` > 1, 'auto' is xla and a named Pallas kernel is an error.

    ``SamplerConfig.kv_layout``: the pool layout. 'auto' is fused for pallas_tpu (it reads only its
    [L, N, page, 2 Hkv, hd]) and for xla on TPUs, split elsewhere (the GPU kernel reads only that). Why a fused,
    page-minor pool [L, N, Hkv, 2, page, hd] written a whole page at a time for xla on TPUs: with split K and V
    pools, the decode step's one-token KV write wants (Hkv, hd) as the tiled minor dimensions and the page gathers
    want (page, hd), so XLA:TPU copied both pools in every decode step (and at entry and exit); with (page, hd)
    minor and page-sized writes, the gathers, the decode write and the prefill write all want the pool row-major.
    XLA's cost analysis of the 7B config's decode step on a v5p-8: 118 -> 4.9 GB accessed per step (42.8 -> 1.8 ms
    at HBM bandwidth), temporaries 20.1 -> 1.1 GB (scripts/plan.py; docs/benchmarks.md). On GPUs with the KV heads
    split over ``tensor`` (the xla kernel) too: there the split pools' page gather, indexed by KV head, is
    partitioned as a gather of every head on every device and a reduce-scatter per chunk; the fused pool's gather
    takes the heads as a slice (the 7B decode step on 8 H100s: 443 -> 175 GB accessed per step; docs/gpu-plan.md)."""
    platform = _platform(mesh)
    name = scfg.attention_kernel
    split = mesh is not None and any(n > 1 for a, n in mesh.shape.items() if a not in BATCH_AXES)
    if name == "auto":
        device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
        nvidia = platform == "gpu" and "rocm" not in getattr(device.client, "platform_version", "").lower()
        name = "xla" if split else "pallas_gpu" if nvidia else "pallas_tpu" if platform == "tpu" else "xla"
    elif name != "xla" and split:
        raise SamplerError(
            f"SamplerConfig.attention_kernel={name!r} needs a sampler mesh without a split 'tensor' axis (got "
            f"{dict(mesh.shape)}): the Pallas kernels run per device (use 'xla' or 'auto', or mesh.tensor=1)"
        )
    native = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(name)
    layout = scfg.kv_layout
    if layout == "auto":
        layout = "fused" if name == "pallas_tpu" or (name == "xla" and (platform == "tpu" or (
            platform == "gpu" and split))) else "split"
    elif (name, layout) in (("pallas_tpu", "split"), ("pallas_gpu", "fused")):
        raise SamplerError(f"SamplerConfig.kv_layout={layout!r}: the {name} kernel reads only the "
                           f"{'fused' if name == 'pallas_tpu' else 'split'} pool layout")
    return AttentionKernel(name, interpret=native is not None and platform != native,
                           fused=name == "xla" and layout == "fused")


def kv_sharding(cfg: QwenConfig, mesh: Mesh | None, kernel: AttentionKernel = XLA) -> NamedSharding | None:
    """Pool sharding (K and V alike): KV heads over ``tensor`` when they divide it, otherwise replicated."""
    if mesh is None:
        return None
    tp = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if tp > 1 and cfg.num_kv_heads % tp == 0 else None
    if kernel.fused:  # [L, N, Hkv, 2, page, hd]
        return NamedSharding(mesh, P(None, None, head_axis, None, None, None))
    if kernel.fused_pool:  # [L, N, page, 2 * Hkv, hd]: a shard holds whole (k, v) head pairs
        return NamedSharding(mesh, P(None, None, None, head_axis, None))
    return NamedSharding(mesh, P(None, head_axis, None, None, None))


def pool_shape(cfg: QwenConfig, scfg: SamplerConfig) -> tuple[int, ...]:
    """KV pool shape per K and V: [L, Hkv, num_pages, page_size, hd] (module docstring)."""
    return (cfg.num_layers, cfg.num_kv_heads, scfg.num_pages, scfg.page_size, cfg.head_dim)


def pool_shapes(cfg: QwenConfig, scfg: SamplerConfig, kernel: AttentionKernel = XLA) -> tuple[tuple[int, ...], ...]:
    """(k_pages, v_pages) shapes: split K / V pools, or the fused pool and an empty placeholder."""
    if kernel.fused:
        return (cfg.num_layers, scfg.num_pages, cfg.num_kv_heads, 2, scfg.page_size, cfg.head_dim), (0,)
    if kernel.fused_pool:
        return (cfg.num_layers, scfg.num_pages, scfg.page_size, 2 * cfg.num_kv_heads, cfg.head_dim), (0,)
    return pool_shape(cfg, scfg), pool_shape(cfg, scfg)


def empty_pool(
    cfg: QwenConfig, scfg: SamplerConfig, dtype: Any, kernel: AttentionKernel, placement: Sharding | Any
) -> tuple[jax.Array, jax.Array]:
    """A zeroed (k_pages, v_pages) pair placed on ``placement`` (the pool sharding, or a device); the empty
    placeholder of the fused layout goes to the same devices, replicated."""
    if not isinstance(placement, Sharding):
        placement = SingleDeviceSharding(placement)
    k_shape, v_shape = pool_shapes(cfg, scfg, kernel)
    v_place = NamedSharding(placement.mesh, P()) if kernel.fused_pool and isinstance(placement, NamedSharding) \
        else placement
    k = jax.jit(lambda: jnp.zeros(k_shape, dtype), out_shardings=placement)()
    return k, jax.jit(lambda: jnp.zeros(v_shape, dtype), out_shardings=v_place)()


CHUNK_TOKENS = {"cpu": 64, "tpu": 512, "gpu": 1024}  # measured on CPU; GPU: few fixed-count iterations


def attention_chunk_pages(scfg: SamplerConfig, mesh: Mesh | None) -> int:
    """``SamplerConfig.attn_chunk_pages``, or by default ``CHUNK_TOKENS[platform] // page_size`` pages."""
    if scfg.attn_chunk_pages is not None:
        return scfg.attn_chunk_pages
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return max(1, CHUNK_TOKENS.get(device.platform, 512) // scfg.page_size)


def dynamic_attention_chunks(scfg: SamplerConfig, mesh: Mesh | None) -> bool:
    """``SamplerConfig.attn_dynamic_chunks``, or by default: data-dependent chunk loop except on GPUs."""
    if scfg.attn_dynamic_chunks is not None:
        return scfg.attn_dynamic_chunks
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    return device.platform != "gpu"
