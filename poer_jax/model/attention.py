"""Causal self-attention of the decoder over a padded batch: one reference and three memory-efficient paths.

For query i and key j of row b (GQA: query head h reads KV head h // (Hq / Hkv)):

    out[b, i, h] = sum_j softmax_j(q[b, i, h] . k[b, j] / sqrt(hd) over allowed j) v[b, j]
    allowed(i, j) = j <= i  and  mask[b, j]                       (mask [B, T]: the real tokens)

Real queries get exactly this in every implementation; outputs at padding positions are finite but
meaningless (they differ between implementations), so callers never read them. Padding may be on either
side (left, right, or both).

Implementations (``QwenConfig.attention``, config key ``model.attention``):

  dense    the reference: [B, Hq, T, T] float32 scores. O(T^2) memory; the CPU path, which runs it one block
           of ``CAUSAL_BLOCK`` queries at a time against the keys up to the block's end (``causal_blocks``): the
           same values without the masked upper triangle's work (0.38x the CPU time at the demo's prefill,
           16 x 384 tokens).
  chunked  the same arithmetic one block of queries at a time under ``jax.checkpoint``: the scores of one
           [block, T] slice live at once, in the forward and the backward pass (O(block * T) memory, about
           2x dense FLOPs for the masked upper half). Pure XLA, runs everywhere: the memory-efficient
           path where no fused kernel is available (the plan of a GPU target without cuDNN uses it).
  cudnn    ``jax.nn.dot_product_attention(implementation='cudnn')``: cuDNN's fused flash attention on
           NVIDIA GPUs (O(T) memory). cuDNN's padding mask is a length per row (real tokens first), so rows
           are rotated to put their real tokens first and rotated back after; real tokens must be one
           contiguous run per row (any left / right padding). Run per shard inside ``jax.shard_map`` as
           splash is (below): JAX's own partitioning rule for the cuDNN call fails under a partly manual mesh
           (the sampler's shard_map over the batch axes with ``tensor`` > 1: "'GSPMDSharding' object has no
           attribute 'spec'").
  splash   Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) on TPU, inside
           ``jax.shard_map`` over the mesh set with ``jax.set_mesh`` (batch over the data / fsdp axes, heads
           over tensor, where they divide). The padding mask is given as segment ids (real tokens 1,
           padding 0), so no softmax row is ever empty. Runs on CPU in Pallas interpret mode (tests).
  auto     splash on TPU, cudnn on GPU, dense elsewhere; the platform is the one of the mesh set with
           ``jax.set_mesh`` (so compiling for a TPU topology on a CPU host picks splash), else JAX's
           default backend.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "chunked", "cudnn", "splash")
_NEG_INF = -1e30  # finite, so fully masked rows (padding queries) give a uniform softmax, not NaN
CHUNK_QUERIES = 512  # query block of the chunked path
CAUSAL_BLOCK = 64  # query block of the dense path's causal blocks (``causal_blocks``)
_SPLASH_BLOCK = 512  # splash tile (q and kv), as MaxText's default; smaller for short sequences
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def current_platform() -> str:
    """'tpu' | 'gpu' | 'cpu': the platform of the mesh set with ``jax.set_mesh``, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        if device is not None and getattr(device, "platform", None):
            return "gpu" if device.platform in ("cuda", "rocm") else str(device.platform)
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm") else backend


def resolve_attention(impl: str, platform: str | None = None, dtype: Any = jnp.bfloat16, head_dim: int = 128) -> str:
    """The concrete implementation for ``impl`` on ``platform`` (default: ``current_platform()``).

    ``auto`` takes a fused kernel only where it applies: cuDNN needs 16-bit inputs and head_dim a multiple of
    8 (<= 256), splash head_dim a multiple of 128; otherwise the chunked path on an accelerator."""
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention: unknown implementation {impl!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    platform = platform or current_platform()
    if platform == "tpu":
        return "splash" if head_dim % 128 == 0 else "chunked"
    if platform == "gpu":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 256 else "chunked"
    return "dense"


def causal_mask(mask: jax.Array) -> jax.Array:
    """[B, T] key-validity mask -> [B, T, T] allowed (query i sees valid keys j <= i)."""
    T = mask.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    return causal[None] & mask[:, None, :].astype(bool)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v with GQA; ``allowed`` [B, Tq, Tk] bool. Softmax in float32.

    q [B, Tq, Hq, hd], k/v [B, Tk, Hkv, hd] -> [B, Tq, Hq, hd].
    """
    B, Tq, Hq, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Heads-major: the G query heads of a KV head stacked along the query axis, so both products are plain
    # batched matmuls over (row, KV head) with the scores [G * Tq, Tk] contiguous. The [b, q, kv, g] layout
    # of the einsums before made XLA:CPU transpose the scores and probabilities: 2.8x slower at B 16, T 256
    # (the demo's prefill), 1.5x in the backward pass (docs/rollout.md).
    qh = q.reshape(B, Tq, Hkv, G, hd).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, hd)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32) * (hd ** -0.5)
    ok = jnp.broadcast_to(allowed[:, None, None], (B, 1, G, Tq, Tk)).reshape(B, 1, G * Tq, Tk)
    probs = jax.nn.softmax(jnp.where(ok, scores, _NEG_INF), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh)
    return out.reshape(B, Hkv, G, Tq, hd).transpose(0, 3, 1, 2, 4).reshape(B, Tq, Hq, hd)


def causal_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = CAUSAL_BLOCK) -> jax.Array:
    """``dense_attention`` with the causal + padding mask, query block i (rows [i b, (i + 1) b)) against keys
    [0, (i + 1) b) only: the keys a causal query can see. Static slices, unrolled: about (n + 1) / 2n of the
    dense work for n blocks, the same arithmetic per allowed pair."""
    T = q.shape[1]
    allowed = causal_mask(mask)
    if T <= block:
        return dense_attention(q, k, v, allowed)
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        outs.append(dense_attention(q[:, start:end], k[:, :end], v[:, :end], allowed[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      block: int = CHUNK_QUERIES) -> jax.Array:
    """``dense_attention`` with the causal + padding mask, one block of queries at a time (rematerialised)."""
    B, T, Hq, hd = q.shape
    block = min(block, T)
    nb = -(-T // block)
    pad = nb * block - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
    q_blocks = qp.reshape(B, nb, block, Hq, hd).swapaxes(0, 1)  # [nb, B, block, Hq, hd]
    valid = mask.astype(bool)
    key_pos = jnp.arange(T, dtype=jnp.int32)

    @jax.checkpoint
    def one(qb: jax.Array, start: jax.Array) -> jax.Array:
        q_pos = start + jnp.arange(block, dtype=jnp.int32)
        allowed = (key_pos[None, :] <= q_pos[:, None])[None] & valid[:, None, :]
        return dense_attention(qb, k, v, allowed)

    starts = jnp.arange(nb, dtype=jnp.int32) * block
    _, out = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (q_blocks, starts))
    return out.swapaxes(0, 1).reshape(B, nb * block, Hq, hd)[:, :T]


def _rotate_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """x[b, t] -> x[b, (t + shift[b]) % T] along axis 1."""
    T = x.shape[1]
    idx = (jnp.arange(T, dtype=jnp.int32)[None, :] + shift[:, None]) % T
    return jnp.take_along_axis(x, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))), axis=1)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN flash attention; each row's contiguous run of real tokens is rotated to the front first.
    ``implementation='xla'`` runs the same call through XLA (the CPU test of the rotation and lengths)."""
    valid = mask.astype(bool)
    T = q.shape[1]
    first = jnp.argmax(valid, axis=1).astype(jnp.int32)  # 0 for right padding: the rotation is the identity
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    qr, kr, vr = (_rotate_rows(x, first) for x in (q, k, v))
    out = jax.nn.dot_product_attention(qr, kr, vr, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return _rotate_rows(out, (T - first) % T)


def _per_shard(fn: Any, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``fn(q, k, v, mask)`` ([B, T, H, hd] layout) on each shard of the mesh set with ``jax.set_mesh``: batch over
    the data / fsdp axes and heads over ``tensor`` where they divide, or ``fn`` itself without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, mask)
    batch = _axes_dividing(mesh, _BATCH_AXES, q.shape[0])
    heads = _axes_dividing(mesh, (_HEAD_AXIS,), k.shape[2]) if _axes_dividing(mesh, (_HEAD_AXIS,), q.shape[2]) \
        else None
    spec = P(batch, None, heads, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                         check_vma=False)(q, k, v, mask)


def _splash_block(T: int) -> int:
    for b in (_SPLASH_BLOCK, 256, 128):
        if T % b == 0:
            return b
    raise ValueError(f"splash attention: sequence length {T} is not a multiple of 128")


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array, interpret: bool) -> jax.Array:
    """Splash on one shard: q [B, Hq, T, hd] (pre-scaled), k/v [B, Hkv, T, hd], seg [B, T] int32."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, Hq, T, _ = q.shape
    b = _splash_block(T)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(Hq)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(q, k, v, seg)


def _axes_dividing(mesh: Any, names: tuple[str, ...], n: int) -> tuple[str, ...] | None:
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return axes if axes and n % size == 0 else None


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
    """Pallas splash attention with the padding mask as segment ids (see the module docstring)."""
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    Tp = -(-T // 128) * 128  # the kernel's tiles are 128-multiples; _splash_block picks the largest that divides
    pad = Tp - T
    seg = mask.astype(jnp.int32)  # padding (0) attends padding: never an empty row; real tokens only real ones

    def heads_first(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x
        return x.swapaxes(1, 2)

    qh = heads_first(q * jnp.asarray(hd ** -0.5, q.dtype))
    kh, vh = heads_first(k), heads_first(v)
    seg = jnp.pad(seg, ((0, 0), (0, pad))) if pad else seg
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = local(qh, kh, vh, seg)
    else:
        batch = _axes_dividing(mesh, _BATCH_AXES, B)
        heads = _axes_dividing(mesh, (_HEAD_AXIS,), Hkv) if _axes_dividing(mesh, (_HEAD_AXIS,), Hq) else None
        spec = P(batch, heads, None, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec,
                            check_vma=False)(qh, kh, vh, seg)
    return out.swapaxes(1, 2)[:, :T]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "dense") -> jax.Array:
    """Causal self-attention over a padded batch (module docstring). q [B, T, Hq, hd], k/v [B, T, Hkv, hd],
    mask [B, T] (real tokens) -> [B, T, Hq, hd] in v's dtype."""
    platform = current_platform()
    impl = resolve_attention(impl, platform, q.dtype, q.shape[-1])
    if impl == "dense":
        return causal_blocks(q, k, v, mask)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask)
    if impl == "cudnn":
        return _per_shard(cudnn_attention, q, k, v, mask).astype(v.dtype)
    return splash_attention(q, k, v, mask, interpret=platform == "cpu").astype(v.dtype)
