"""LoRA adapters over the Qwen parameter tree: their shapes, initialisation, shardings, and the two ways a run
uses them with the frozen base weights (``lora.py`` has the per-product math).

The adapter tree mirrors the adapted weights of ``param_shapes`` (stacked over layers)::

    layers/q_proj/a [L, D, r]   layers/q_proj/b [L, r, Hq*hd]   ...   layers/down_proj/a [L, F, r]   .../b [L, r, D]

``attach(base, adapters)``: the base tree with each adapted weight replaced by a ``LoraWeight`` (the update's
forward: gradients reach the adapters only). ``merge(base, adapters)``: plain weights W + (alpha / r) A B (the
sampler's, the export's). Sharding: A follows its weight's input axis, B its output axis, the rank axis is
replicated (as qwix derives them), so an FSDP / tensor mesh splits the adapters where it splits the weights.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LORA_TARGETS, LoraConfig, LoraWeight, init_a, init_b, merged_weight
from poer_jax.model.qwen import Params, param_shapes
from poer_jax.model.sharding import param_spec


def adapter_shapes(cfg: QwenConfig, lora: LoraConfig) -> dict[str, Any]:
    """Shape tree of the adapters (module docstring)."""
    layers = param_shapes(cfg)["layers"]
    r = lora.rank
    return {"layers": {name: {"a": (*layers[name][:-1], r), "b": (layers[name][0], r, layers[name][-1])}
                       for name in lora.products}}


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def abstract_adapters(cfg: QwenConfig, lora: LoraConfig, dtype: Any = None,
                      shardings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapters as ``jax.ShapeDtypeStruct`` (default dtype: ``cfg.param_dtype``), with ``shardings`` if given."""
    dtype = cfg.jnp_param_dtype if dtype is None else dtype
    shapes = adapter_shapes(cfg, lora)
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=_is_shape)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh), shapes, shardings,
                        is_leaf=_is_shape)


def init_adapters(cfg: QwenConfig, lora: LoraConfig, key: jax.Array, dtype: Any = None) -> dict[str, Any]:
    """A Kaiming-uniform, B zero (``lora.init_a`` / ``init_b``), in ``dtype`` (default ``cfg.param_dtype``); one
    key per adapted weight, so adding a target leaves the others' initial values unchanged."""
    dtype = cfg.jnp_param_dtype if dtype is None else dtype
    out = {}
    for name, s in adapter_shapes(cfg, lora)["layers"].items():
        k = jax.random.fold_in(key, list(LORA_TARGETS.values()).index(name))
        out[name] = {"a": init_a(k, s["a"], dtype), "b": init_b(s["b"], dtype)}
    return {"layers": out}


def adapter_specs(cfg: QwenConfig, lora: LoraConfig, mesh: Mesh) -> dict[str, Any]:
    """PartitionSpecs of the adapters: A [L, in, r] as its weight's (layer, input) axes, B [L, r, out] as its
    (layer, output) axes; the rank replicated."""
    base = param_shapes(cfg)["layers"]
    out = {}
    for name in lora.products:
        layer, d_in, d_out = param_spec(f"layers/{name}", base[name], cfg, mesh)
        out[name] = {"a": P(layer, d_in, None), "b": P(layer, None, d_out)}
    return {"layers": out}


def adapter_shardings(cfg: QwenConfig, lora: LoraConfig, mesh: Mesh) -> dict[str, Any]:
    """Tree of NamedSharding matching ``adapter_shapes`` (``adapter_specs`` on ``mesh``)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), adapter_specs(cfg, lora, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def attach(base: Params, adapters: dict[str, Any], lora: LoraConfig, key: jax.Array | None = None) -> Params:
    """``base`` (stacked layers) with each adapted weight a ``LoraWeight``: the model then computes
    x W + (alpha / r) (dropout(x) A) B. ``key``: the dropout masks' key (one per layer and weight, folded from
    it); None, or ``lora.dropout`` = 0, runs without dropout (log-prob passes, evaluation)."""
    layers = dict(base["layers"])
    L = next(iter(adapters["layers"].values()))["a"].shape[0]
    use_dropout = key is not None and lora.dropout > 0
    for i, name in enumerate(lora.products):
        ad = adapters["layers"][name]
        keys = jax.random.key_data(jax.random.split(jax.random.fold_in(key, i), L)) if use_dropout else None
        layers[name] = LoraWeight(layers[name], ad["a"], ad["b"], keys, lora.scale, lora.dropout)
    return {**base, "layers": layers}


def merge(base: Params, adapters: dict[str, Any], lora: LoraConfig) -> Params:
    """``base`` with W + (alpha / r) A B for every adapted weight (``lora.merged_weight``: float32 sums, the
    base's dtype): the plain weights the sampler decodes with and the export writes."""
    layers = dict(base["layers"])
    for name in lora.products:
        ad = adapters["layers"][name]
        layers[name] = merged_weight(layers[name], ad["a"], ad["b"], lora.scale)
    return {**base, "layers": layers}
