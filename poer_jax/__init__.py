"""poer_jax: POER (Policy Optimization with Experience Replay) for Qwen-architecture LLMs in JAX.

The public API, imported lazily (``import poer_jax`` stays cheap, e.g. in reward worker processes)::

    QwenConfig, QwenForCausalLM, load_hf, export_hf, preset, make_mesh   # model
    GroupSampler, SamplerConfig, SamplingParams, PagedEngine            # sampler
    CachePool, TruncationConfig, truncate, update_cache, length_aware_reward   # POER
    group_advantages, LossConfig, compute_loss, Trainer, OptimConfig    # RL
    default_config, PoerTrainer                                          # training
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QwenConfig": "poer_jax.model", "QwenForCausalLM": "poer_jax.model", "load_hf": "poer_jax.model",
    "export_hf": "poer_jax.model", "preset": "poer_jax.model", "make_mesh": "poer_jax.model",
    "forward": "poer_jax.model", "init_params": "poer_jax.model",
    "GroupSampler": "poer_jax.sampler", "SamplerConfig": "poer_jax.sampler", "SamplingParams": "poer_jax.sampler",
    "PagedEngine": "poer_jax.sampler", "SampleOutput": "poer_jax.sampler",
    "CachePool": "poer_jax.poer", "TruncationConfig": "poer_jax.poer", "truncate": "poer_jax.poer",
    "length_aware_reward": "poer_jax.poer",
    "group_advantages": "poer_jax.rl", "LossConfig": "poer_jax.rl", "compute_loss": "poer_jax.rl",
    "Trainer": "poer_jax.rl", "TrainState": "poer_jax.rl", "OptimConfig": "poer_jax.rl",
    "build_rollout_batch": "poer_jax.rl",
    "default_config": "poer_jax.system.config", "PoerTrainer": "poer_jax.train.loop",
}
_RENAMED = {"update_cache": ("poer_jax.poer", "update")}

__all__ = sorted([*_EXPORTS, *_RENAMED])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'poer_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
