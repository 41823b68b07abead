"""Device mesh and the one partition-rule table for every Qwen parameter.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (parameters sharded, batch sharded), ``tensor``
(Megatron-style head / MLP sharding). A dimension whose size (or head count) does not divide its mesh
axis is replicated along that axis instead of failing — e.g. 2 KV heads on a tensor axis of 4.
``device_bytes`` counts what one device holds of a sharded pytree (concrete or abstract arrays).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import param_shapes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# name -> per-dimension mesh axis (None = replicated). Layer weights have a leading [num_layers] axis.
PARAM_RULES: dict[str, tuple[str | None, ...]] = {
    "embed": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "final_norm": (None,),
    "layers/input_norm": (None, None),
    "layers/post_norm": (None, None),
    "layers/q_proj": (None, "fsdp", "tensor"),
    "layers/k_proj": (None, "fsdp", "tensor"),
    "layers/v_proj": (None, "fsdp", "tensor"),
    "layers/q_bias": (None, "tensor"),
    "layers/k_bias": (None, "tensor"),
    "layers/v_bias": (None, "tensor"),
    "layers/o_proj": (None, "tensor", "fsdp"),
    "layers/q_norm": (None, None),
    "layers/k_norm": (None, None),
    "layers/gate_proj": (None, "fsdp", "tensor"),
    "layers/up_proj": (None, "fsdp", "tensor"),
    "layers/down_proj": (None, "tensor", "fsdp"),
}


def _head_units(cfg: QwenConfig) -> dict[str, int]:
    """Along the tensor-sharded dim of attention weights the atomic unit is a head, not a column."""
    return {"layers/q_proj": cfg.num_heads, "layers/q_bias": cfg.num_heads, "layers/o_proj": cfg.num_heads,
            "layers/k_proj": cfg.num_kv_heads, "layers/k_bias": cfg.num_kv_heads,
            "layers/v_proj": cfg.num_kv_heads, "layers/v_bias": cfg.num_kv_heads}


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over (data, fsdp, tensor); one entry may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh: expected {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh: {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1, 1), jax.devices()[:1])


def param_spec(name: str, shape: tuple[int, ...], cfg: QwenConfig, mesh: Mesh) -> P:
    """Partition spec for the parameter ``name`` ('embed', 'layers/q_proj', ...)."""
    if name not in PARAM_RULES:
        raise KeyError(f"no partition rule for parameter {name!r}")
    rule = PARAM_RULES[name]
    units = _head_units(cfg).get(name)
    spec: list[str | None] = []
    for dim, axis in zip(shape, rule, strict=True):
        if axis is None or mesh.shape[axis] == 1:
            spec.append(None)
            continue
        n = mesh.shape[axis]
        count = units if (axis == "tensor" and units is not None) else dim
        spec.append(axis if count % n == 0 and dim % n == 0 else None)
    return P(*spec)


def _flat_names(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_names(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def param_shardings(cfg: QwenConfig, mesh: Mesh) -> dict[str, Any]:
    """Tree of NamedSharding matching ``param_shapes(cfg)``."""
    flat = _flat_names(param_shapes(cfg))
    return _unflatten({n: NamedSharding(mesh, param_spec(n, s, cfg, mesh)) for n, s in flat.items()})


def decode_param_shardings(cfg: QwenConfig, mesh: Mesh) -> dict[str, Any]:
    """The sampler's layout: the rule table without ``fsdp`` (replicated over the batch axes, so each device
    decodes its own rows with whole weights), heads / MLP columns still split over ``tensor``."""
    flat = _flat_names(param_shapes(cfg))

    def spec(name: str, shape: tuple[int, ...]) -> P:
        return P(*(None if a in BATCH_AXES else a for a in param_spec(name, shape, cfg, mesh)))

    return _unflatten({n: NamedSharding(mesh, spec(n, s)) for n, s in flat.items()})


def shard_params(params: dict[str, Any], cfg: QwenConfig, mesh: Mesh) -> dict[str, Any]:
    """Place an existing parameter tree on the mesh with the rule-table shardings."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


flat_param_names = _flat_names
unflatten_param_names = _unflatten


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of abstract (or concrete) arrays with shardings: the largest shard."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        dtype = leaf.dtype
        itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total
