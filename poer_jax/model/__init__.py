"""Qwen2/Qwen3 in JAX: config, pure-functional decoder, presets, HF weight I/O, mesh sharding.

Owns: the model (its config, parameters, forward pass, attention, the packed CPU matmul kernel), LoRA adapters on
its products (``lora``, ``adapters``), reading and writing HF checkpoints and PEFT adapters (``peft_io``), the
device mesh and every parameter's sharding.
May import: the leaf modules only (nothing of poer_jax above it).
"""

from poer_jax.model.config import ModelConfigError, QwenConfig
from poer_jax.model.module import QwenForCausalLM
from poer_jax.model.presets import PRESET_PARAM_COUNTS, preset, preset_names
from poer_jax.model.qwen import (
    Params,
    forward,
    forward_logits,
    init_params,
    logits_from_hidden,
    param_count,
    param_shapes,
    positions_from_mask,
)
from poer_jax.model.safetensors_io import WeightFileError
from poer_jax.model.sharding import batch_sharding, make_mesh, param_shardings, shard_params
from poer_jax.model.weights import WEIGHT_TABLE, export_hf, load_hf

__all__ = [
    "PRESET_PARAM_COUNTS", "WEIGHT_TABLE", "ModelConfigError", "Params", "QwenConfig", "QwenForCausalLM",
    "WeightFileError",
    "batch_sharding", "export_hf", "forward", "forward_logits", "init_params", "load_hf", "logits_from_hidden",
    "make_mesh", "param_count", "param_shapes", "param_shardings", "positions_from_mask", "preset",
    "preset_names", "shard_params",
]
