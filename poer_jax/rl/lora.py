"""The LoRA update's trainable subset: which weights the update trains and how the model is assembled from them.

A full update trains the model's weights. A LoRA update (``model/lora.py``, ``model/adapters.py``) trains the
adapters only: the base weights are frozen in the compute dtype, the model runs with the adapters attached
(``policy_params``), the gradient, the Adam moments and the checkpoints cover the adapters alone, and the KL
reference is the base with the adapters off. ``update.py``'s programs take the base as an argument that is never
donated, so it is neither copied nor rewritten per step.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from poer_jax.model.adapters import abstract_adapters, adapter_shardings, attach, init_adapters, merge
from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LoraConfig
from poer_jax.model.qwen import Params, param_shapes
from poer_jax.model.sharding import param_shardings

INIT_STREAM, DROPOUT_STREAM = 0, 1  # fold_in(key(lora.seed), stream): the adapters' init, the dropout masks


def policy_params(params: Params, frozen: Params | None, lora: LoraConfig | None,
                  key: jax.Array | None = None) -> Params:
    """The weights the model runs with: ``params`` (a full update, or LoRA's base alone: ``frozen`` None), or the
    frozen base with the adapters ``params`` attached (LoRA; ``key`` draws the adapters' dropout masks)."""
    return params if lora is None or frozen is None else attach(frozen, params, lora, key)


def trainable_shardings(model_cfg: QwenConfig, mesh: Mesh, lora: LoraConfig | None) -> Any:
    """Shardings of the trained weights: the model's rule table, or the adapters' (``model/adapters.py``)."""
    return param_shardings(model_cfg, mesh) if lora is None else adapter_shardings(model_cfg, lora, mesh)


def abstract_trainable(model_cfg: QwenConfig, lora: LoraConfig | None, dtype: Any) -> Any:
    """The trained weights (the model's, or the adapters) as ``jax.ShapeDtypeStruct`` of ``dtype``."""
    if lora is not None:
        return abstract_adapters(model_cfg, lora, dtype)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(model_cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def dropout_key(lora: LoraConfig | None, step: jax.Array) -> jax.Array | None:
    """The key of one update's dropout masks: fold_in(key(lora.seed) -> DROPOUT_STREAM, step); None without
    dropout. ``step`` is the train state's, so a resumed run draws the masks of an uninterrupted one."""
    if lora is None or lora.dropout == 0:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(lora.seed), DROPOUT_STREAM), step)


def freeze_base(params: Params, model_cfg: QwenConfig, mesh: Mesh | None) -> Params:
    """The base weights as the LoRA update keeps them: compute dtype, the rule-table shardings on ``mesh``. Weights
    already so are taken as they are (no copy); others are cast and placed by one jitted program."""
    dt = model_cfg.jnp_dtype
    target = None if mesh is None else param_shardings(model_cfg, mesh)
    leaves = jax.tree.leaves(params)
    placed = target is None or all(
        isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(leaves, jax.tree.leaves(target), strict=True))
    if placed and all(x.dtype == dt for x in leaves):
        return params
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dt), p), out_shardings=target)(params)


def new_adapters(model_cfg: QwenConfig, lora: LoraConfig, shardings: Any = None) -> dict[str, Any]:
    """Fresh adapters (A Kaiming-uniform, B zero) from ``lora.seed``, made in place with ``shardings``."""
    key = jax.random.fold_in(jax.random.key(lora.seed), INIT_STREAM)
    return jax.jit(lambda: init_adapters(model_cfg, lora, key), out_shardings=shardings)()


_merge = jax.jit(merge, static_argnames=("lora",))


def merged_policy(base: Params, adapters: dict[str, Any], lora: LoraConfig) -> Params:
    """The base with the adapters merged (W + (alpha / r) A B; ``model.adapters.merge``), one jitted program."""
    return _merge(base, adapters, lora=lora)
