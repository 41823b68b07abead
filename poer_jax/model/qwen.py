"""The Qwen2/Qwen3 decoder as pure JAX functions over a stacked parameter pytree.

Parameters (``init_params`` / ``load_hf``) are a dict; every per-layer weight carries a leading
``[num_layers]`` axis so the decoder is one ``lax.scan`` and compile time does not grow with depth::

    embed        [V, D]             final_norm [D]          lm_head [D, V]  (absent when tied)
    layers/input_norm [L, D]        layers/post_norm [L, D]
    layers/q_proj [L, D, Hq*hd]     layers/q_bias [L, Hq*hd]   (qwen2; also qwen3 with attention_bias)
    layers/k_proj [L, D, Hkv*hd]    layers/k_bias [L, Hkv*hd]
    layers/v_proj [L, D, Hkv*hd]    layers/v_bias [L, Hkv*hd]
    layers/o_proj [L, Hq*hd, D]
    layers/q_norm [L, hd]           layers/k_norm [L, hd]      (qwen3)
    layers/gate_proj [L, D, F]      layers/up_proj [L, D, F]   layers/down_proj [L, F, D]

The per-layer building blocks (``attention_inputs``, ``dense_attention``, ``attention_output``) are public
so that the paged-KV sampler runs the very same arithmetic with its own attention over pages.
RMSNorm, RoPE and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from poer_jax.model.attention import attention, causal_mask, dense_attention  # noqa: F401  (re-exported: sampler, tests)
from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LoraWeight, lora_delta
from poer_jax.model.packed_matmul import PackedWeight, packed_matmul

Params = dict[str, Any]


def param_shapes(cfg: QwenConfig) -> dict[str, Any]:
    """Shape tree of the parameters (the single source of truth for init, loading and sharding)."""
    L, D, F, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layers: dict[str, tuple[int, ...]] = {
        "input_norm": (L, D),
        "post_norm": (L, D),
        "q_proj": (L, D, q),
        "k_proj": (L, D, kv),
        "v_proj": (L, D, kv),
        "o_proj": (L, q, D),
        "gate_proj": (L, D, F),
        "up_proj": (L, D, F),
        "down_proj": (L, F, D),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=(L, q), k_bias=(L, kv), v_bias=(L, kv))
    if cfg.qk_norm:
        layers.update(q_norm=(L, hd), k_norm=(L, hd))
    shapes: dict[str, Any] = {"embed": (cfg.vocab_size, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, cfg.vocab_size)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith("norm")


def init_params(cfg: QwenConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, zero biases, unit norms) in ``cfg.param_dtype``."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys, strict=True):
        name = path[-1].key
        if _is_norm(name):
            leaves.append(jnp.ones(shape, cfg.jnp_param_dtype))
        elif name.endswith("bias"):
            leaves.append(jnp.zeros(shape, cfg.jnp_param_dtype))
        else:
            leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.jnp_param_dtype))
    return jax.tree.unflatten(treedef, leaves)


def param_count(cfg: QwenConfig) -> int:
    """Number of parameters, computed from the shape tree (equals HF's count for the same config)."""
    total = 0
    for shape in jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)):
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


# ---- building blocks ----------------------------------------------------------------------------------
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = w * x / sqrt(mean(x^2) + eps), statistics in float32, result in x's dtype (as HF)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half convention of HF Qwen) on x [..., T, H, hd] at positions [..., T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, hd/2]
    cos = jnp.cos(freqs)[..., None, :]
    sin = jnp.sin(freqs)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : hd // 2], x32[..., hd // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None, dtype: Any) -> jax.Array:
    """y = x w (+ b) over the last axis of x [..., D], w [D, F].

    One 2-D matmul over the flattened leading axes: the same products as an einsum (forward bit-identical),
    but XLA:CPU runs the backward of a 2-D dot as two plain GEMMs instead of batched dots with transposes
    (about 1.5x faster model backward on CPU, see README). A ``PackedWeight`` (the CPU sampler's weights,
    ``sampler/packed_weights.py``) runs the packed FFI kernel instead. A ``LoraWeight`` (``lora.py``) adds its
    adapters' product to the frozen weight's, which runs exactly as a plain weight's."""
    if isinstance(w, LoraWeight):
        return _linear(x, w.base, b, dtype) + lora_delta(x, w, dtype)
    if isinstance(w, PackedWeight):  # float32 accumulation, rounded to the compute dtype as XLA's dot is
        y = packed_matmul(x.astype(dtype), w).astype(dtype)
        return y if b is None else y + b.astype(dtype)
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), w.astype(dtype)).reshape(*lead, w.shape[-1])
    return y if b is None else y + b.astype(dtype)


def attention_inputs(
    lp: Params, cfg: QwenConfig, x: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm, q/k/v projections, Qwen3's q/k norms and RoPE for one layer.

    x [B, T, D] -> q [B, T, Hq, hd], k [B, T, Hkv, hd], v [B, T, Hkv, hd] (compute dtype).
    """
    dt = cfg.jnp_dtype
    B, T, _ = x.shape
    h = rms_norm(x, lp["input_norm"], cfg.rms_norm_eps)
    q = _linear(h, lp["q_proj"], lp.get("q_bias"), dt).reshape(B, T, cfg.num_heads, cfg.head_dim)
    k = _linear(h, lp["k_proj"], lp.get("k_bias"), dt).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    v = _linear(h, lp["v_proj"], lp.get("v_bias"), dt).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta), v


def attention_output(lp: Params, cfg: QwenConfig, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection + residual, then the SwiGLU MLP block + residual. attn [B, T, Hq, hd]."""
    dt = cfg.jnp_dtype
    B, T = attn.shape[:2]
    x = x + _linear(attn.reshape(B, T, -1), lp["o_proj"], None, dt).astype(x.dtype)
    h = rms_norm(x, lp["post_norm"], cfg.rms_norm_eps)
    gate = _linear(h, lp["gate_proj"], None, dt)
    up = _linear(h, lp["up_proj"], None, dt)
    return x + _linear(jax.nn.silu(gate) * up, lp["down_proj"], None, dt).astype(x.dtype)


def embed(params: Params, cfg: QwenConfig, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.jnp_dtype)


def final_norm(params: Params, cfg: QwenConfig, x: jax.Array) -> jax.Array:
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def lm_head_weight(params: Params, cfg: QwenConfig) -> Any:
    """[D, V] output projection (the transposed embedding when embeddings are tied; a ``PackedWeight`` in the CPU
    sampler's packed weights, which hold it under ``lm_head`` either way)."""
    if isinstance(params.get("lm_head"), PackedWeight):
        return params["lm_head"]
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, cfg: QwenConfig, hidden: jax.Array) -> jax.Array:
    """Final hidden states [..., D] -> float32 logits [..., V]."""
    w = lm_head_weight(params, cfg)
    if isinstance(w, PackedWeight):  # float32 results, as the einsum's preferred_element_type
        return packed_matmul(hidden.astype(cfg.jnp_dtype), w)
    w = w.astype(cfg.jnp_dtype)
    return jnp.einsum("...d,dv->...v", hidden.astype(cfg.jnp_dtype), w, preferred_element_type=jnp.float32)


# ---- full forward -------------------------------------------------------------------------------------
def forward(
    params: Params,
    cfg: QwenConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    return_kv: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Decoder over a padded batch; returns final-normed hidden states [B, T, D] (compute dtype).

    tokens [B, T] int; positions [B, T] RoPE positions (default: 0..T-1; with left padding pass
    ``cumsum(mask) - 1``); mask [B, T] bool marks real tokens (keys at masked slots are never attended;
    outputs at masked slots are defined but meaningless). Attention is causal over the T index, so left
    and right padding both work; ``cfg.attention`` picks its implementation (``attention.py``). With
    ``return_kv`` also returns per-layer (k, v), each [L, B, T, Hkv, hd], e.g. for a sampler's prefill.
    ``params["layers"]`` is stacked (one ``lax.scan``) or a tuple of per-layer dicts (the layers unrolled: the
    sampler's weights on CPU, ``GroupSampler.update_params``).
    """
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if mask is None:
        mask = jnp.ones((B, T), dtype=bool)

    def layer(x: jax.Array, lp: Params) -> tuple[jax.Array, Any]:
        q, k, v = attention_inputs(lp, cfg, x, positions)
        x = attention_output(lp, cfg, x, attention(q, k, v, mask, cfg.attention))
        return x, ((k, v) if return_kv else None)

    if cfg.remat:
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
    if isinstance(params["layers"], (tuple, list)):  # per-layer weights (the CPU sampler's): unrolled
        x, per_layer = embed(params, cfg, tokens), []
        for lp in params["layers"]:
            x, kv_l = layer(x, lp)
            per_layer.append(kv_l)
        kv = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if return_kv else None
    else:
        x, kv = jax.lax.scan(layer, embed(params, cfg, tokens), params["layers"])
    hidden = final_norm(params, cfg, x)
    return (hidden, kv) if return_kv else hidden


def forward_logits(
    params: Params, cfg: QwenConfig, tokens: jax.Array, positions: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Convenience: float32 logits [B, T, V]. Training code should use hidden states + chunked log-probs."""
    return logits_from_hidden(params, cfg, forward(params, cfg, tokens, positions, mask))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """RoPE positions for a padded batch: 0, 1, ... over the real tokens, whatever the padding side."""
    m = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
