"""What a run keeps on every device, estimated without compiling (``resident_estimate``), and the check a run
makes before any loading: the batch layout and the resident set against the device's memory
(``check_before_work``). The plan sizes the KV pool with the same estimate (``trainer_and_sampler_config``)."""

from __future__ import annotations

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax.model.config import QwenConfig
from poer_jax.model.sharding import device_bytes
from poer_jax.rl.programs import abstract_params, abstract_train_state
from poer_jax.rl.update import Trainer
from poer_jax.sampler import SamplerConfig
from poer_jax.sampler.budget import kv_bytes_per_page
from poer_jax.sampler.sharded import head_shards
from poer_jax.system.config import ConfigError
from poer_jax.system.mesh import check_batch_layout
from poer_jax.system.model import model_shapes
from poer_jax.system.sampler import abstract_decode_params, sampler_config_for
from poer_jax.system.update import build_update_trainer

GB = 1e9  # as in the plan's reports (poer_jax.plan.targets.GB)


def resident_estimate(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                      memory_bytes: float | None = None) -> dict[str, int]:
    """Per-device bytes of what a run keeps on every device, without compiling: train state (weights + Adam
    moments; with LoRA the adapters and theirs, plus the frozen base weights in the compute dtype), reference
    weights (beta > 0, not with LoRA), the update's float32 gradient, the sampler's decode-layout copy
    of the weights (compute dtype, whole on every device of the batch axes, split over ``tensor``) and the KV
    pool (from the budget keys; ``rollout.kv_cache_fraction`` takes its share of what the rollout's other
    buffers leave of ``memory_bytes``). The last two are live during the rollout only, the gradient during
    the update only (``rollout_and_update_bytes``)."""
    trainer = build_update_trainer(cfg, mcfg, mesh)
    out = {"train state": device_bytes(abstract_train_state(trainer))}
    if trainer.lora is not None:  # frozen base in the compute dtype, also the KL reference: no reference copy
        out["base weights"] = device_bytes(abstract_params(trainer, mcfg.jnp_dtype))
    elif cfg.loss.beta > 0:
        out["reference weights"] = device_bytes(abstract_params(trainer, mcfg.jnp_dtype))
    state = abstract_train_state(trainer)  # the gradient: float32, shaped and sharded as the trained weights
    out["gradient"] = device_bytes(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jax.numpy.float32, sharding=x.sharding), state.params))
    out["sampler weights"] = device_bytes(abstract_decode_params(mcfg, mesh))
    free = None if memory_bytes is None else max(memory_bytes - sum(out.values()) + out["gradient"], 0.0)
    scfg = sampler_config_for(cfg, mcfg, mesh, free)
    per_page = kv_bytes_per_page(mcfg, scfg.page_size, scfg.kv_dtype or mcfg.dtype, head_shards(mcfg, mesh))
    out["KV pool (K and V)"] = scfg.num_pages * per_page
    return out


def rollout_and_update_bytes(parts: dict[str, int]) -> tuple[int, int]:
    """(rollout, update) per-device bytes of ``resident_estimate``'s parts: the trainer releases the
    sampler's weights and KV pool for the update (``GroupSampler.release``)."""
    total = sum(parts.values())
    rollout_only = parts.get("sampler weights", 0) + parts.get("KV pool (K and V)", 0)
    return total - parts.get("gradient", 0), total - rollout_only


def check_resident_memory(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                          memory_bytes: float | None) -> None:
    """ConfigError naming the keys when the resident set alone exceeds ``memory_bytes`` per device."""
    if not memory_bytes:
        return
    parts = resident_estimate(cfg, mcfg, mesh, memory_bytes)
    total = max(rollout_and_update_bytes(parts))
    if total > memory_bytes:
        detail = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in parts.items())
        raise ConfigError(
            f"the run does not fit: per device it keeps up to {total / GB:.1f} GB ({detail}; the sampler's weights "
            "and KV pool during the rollout, the gradient during the update) before any activation, "
            f"the device has {memory_bytes / GB:.1f} GB. Change mesh.* (shard over more devices), "
            "rollout.kv_cache_gb / rollout.kv_cache_fraction / rollout.num_pages, loss.beta, model.param_dtype or "
            "lora.rank (LoRA: frozen base weights, no reference copy); "
            "scripts/plan.py --target=... gives the full plan")


def trainer_and_sampler_config(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh,
                               memory_bytes: float | None = None) -> tuple[Trainer, SamplerConfig]:
    """The run's ``Trainer`` and ``SamplerConfig`` on ``mesh`` (as ``PoerTrainer`` builds them), the KV pool
    sized for a device of ``memory_bytes``."""
    trainer = build_update_trainer(cfg, mcfg, mesh)
    free = None
    if memory_bytes is not None:
        parts = resident_estimate(cfg, mcfg, mesh, memory_bytes)
        free = max(memory_bytes - rollout_and_update_bytes(parts)[0] + parts["KV pool (K and V)"], 0.0)
    return trainer, sampler_config_for(cfg, mcfg, mesh, free)


def check_before_work(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Fail before loading anything when the batch rows do not divide the batch devices, or when what the
    run keeps on every device (``resident_estimate``) exceeds the device's memory (where the
    backend reports it: GPU, TPU)."""
    check_batch_layout(cfg, mesh)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = (local[0].memory_stats() if local else None) or {}  # this process's device: no remote query
    if stats.get("bytes_limit"):
        check_resident_memory(cfg, model_shapes(cfg)[0], mesh, float(stats["bytes_limit"]))
