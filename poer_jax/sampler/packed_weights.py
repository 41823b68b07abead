"""The sampler's weights with their products pre-packed for the CPU kernel (``SamplerConfig.matmul_kernel``).

On CPU the sampler holds its own per-layer copy of the weights (``unstack_layers``). With
``matmul_kernel='packed_cpu'`` (the default on CPU where it applies) that copy has every 2-D product weight packed
in 32-column panels (``model.packed_matmul.PackedWeight``), plus the output projection under ``lm_head`` (the
transposed embedding when embeddings are tied), packed once per ``update_params``; the model's ``_linear`` and
``logits_from_hidden`` then run the FFI kernel instead of XLA's dot: ~2.3x faster products at 8 rows on one core
(docs/benchmarks.md). Norms, biases and the embedding stay as they are.

Where it applies: a CPU sampler with the layers unrolled, float32 or bfloat16 compute, and no tensor parallelism
(the custom call has no partitioning rule; the batch axes are fine: each device runs it on its own rows under
shard_map).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig
from poer_jax.model.packed_matmul import TARGETS, PackedWeight, kernel_error, pack, unpack
from poer_jax.model.qwen import Params, lm_head_weight
from poer_jax.sampler.pages import SamplerConfig, SamplerError

_warned: set[str] = set()
PRODUCTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def packed_matmul_reason(cfg: QwenConfig, mesh: Mesh | None, unrolled: bool) -> str:
    """'' when the sampler can use the packed CPU kernel, else why not."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    if device.platform != "cpu":
        return f"the sampler runs on {device.platform}, the kernel on CPU only"
    if not unrolled:
        return "layer_loop='scan' (the kernel takes per-layer weights)"
    if jnp.dtype(cfg.jnp_dtype) not in TARGETS:
        return f"compute dtype {cfg.dtype} (the kernel takes float32 or bfloat16)"
    if mesh is not None and mesh.shape.get("tensor", 1) > 1:
        return "tensor parallelism (the custom call has no partitioning rule)"
    return kernel_error()


def use_packed_matmuls(scfg: SamplerConfig, cfg: QwenConfig, mesh: Mesh | None, unrolled: bool) -> bool:
    """``SamplerConfig.matmul_kernel``: 'auto' packs where it applies (above); 'packed_cpu' raises SamplerError
    saying why it cannot; 'xla' keeps XLA's dot."""
    if scfg.matmul_kernel == "xla":
        return False
    reason = packed_matmul_reason(cfg, mesh, unrolled)
    if reason and scfg.matmul_kernel == "packed_cpu":
        raise SamplerError(f"SamplerConfig.matmul_kernel='packed_cpu' cannot be used: {reason}")
    if reason.startswith("packed_matmul:") and reason not in _warned:  # it applies but did not build: say so once
        _warned.add(reason)
        warnings.warn(f"the sampler uses XLA's dot on CPU (~2x slower decoding): {reason}", stacklevel=2)
    return not reason


def pack_weights(params: Params, cfg: QwenConfig) -> Params:
    """Per-layer weights (``unstack_layers``) -> the same with each product weight and the output projection
    packed (``lm_head``, added when embeddings are tied). Jit it: one pass over the weights."""
    layers = tuple({k: pack(v) if k in PRODUCTS else v for k, v in lp.items()} for lp in params["layers"])
    return {**params, "layers": layers, "lm_head": pack(lm_head_weight(params, cfg))}


def unpack_weights(params: Params, cfg: QwenConfig) -> Params:
    """The inverse of ``pack_weights`` (a copy): the model's per-layer weights."""
    if not isinstance(params.get("lm_head"), PackedWeight):
        return params
    layers = tuple({k: unpack(v) if isinstance(v, PackedWeight) else v for k, v in lp.items()}
                   for lp in params["layers"])
    out = {**params, "layers": layers}
    if cfg.tie_word_embeddings:
        del out["lm_head"]
    else:
        out["lm_head"] = unpack(params["lm_head"])
    return out


def packed_shardings(layer_shardings: Params) -> Params:
    """The shardings of ``pack_weights``' output given those of its input (``layer_shardings``): packed weights
    are whole on every device (no tensor axis here), as a sharding prefix of each ``PackedWeight``."""

    def whole(s: Any) -> Any:
        return NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else s

    layers = tuple({k: whole(v) if k in PRODUCTS else v for k, v in lp.items()} for lp in layer_shardings["layers"])
    return {**layer_shardings, "layers": layers, "lm_head": whole(layer_shardings["embed"])}


def abstract_packed(per_layer: Params, cfg: QwenConfig, shardings: Params | None) -> Params:
    """Abstract ``pack_weights`` output (for AOT compiles) from abstract per-layer weights and their shardings."""
    out = jax.eval_shape(lambda p: pack_weights(p, cfg), per_layer)
    if shardings is None:
        return out
    flat = jax.tree.leaves(packed_shardings(shardings), is_leaf=lambda x: x is None)
    # one sharding per PackedWeight (a prefix) -> one per leaf: each PackedWeight has one array leaf
    leaves, treedef = jax.tree.flatten(out)
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                        for a, s in zip(leaves, flat, strict=True)])
