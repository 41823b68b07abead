"""The update step from the config (Eq. 5-7): its loss, optimizer and LoRA configs and the jitted ``Trainer`` on
the mesh. The run builds its train state with it from real weights; the plan takes the same trainer's abstract
state and programs (``poer_jax.rl.programs``)."""

from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LoraConfig
from poer_jax.rl import LossConfig
from poer_jax.rl.optim import OptimConfig
from poer_jax.rl.update import Trainer
from poer_jax.system.config import ConfigError


def build_optim_config(cfg: ml_collections.ConfigDict) -> OptimConfig:
    o = cfg.optim
    try:
        return OptimConfig(
            learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
            total_steps=cfg.train.max_steps * o.num_iterations * o.num_minibatches,
            min_lr_ratio=o.min_lr_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
            max_grad_norm=o.max_grad_norm or None)
    except ValueError as e:  # e.g. warmup longer than the run: name the config keys
        raise ConfigError(f"config section 'optim': {e}") from e


def build_loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    lc = cfg.loss
    return LossConfig(objective=lc.objective, epsilon_low=lc.epsilon_low, epsilon_high=lc.epsilon_high,
                      dual_clip=lc.dual_clip, beta=lc.beta, aggregation=lc.aggregation,
                      max_completion_len=cfg.rollout.max_completion_len)


def build_lora_config(cfg: ml_collections.ConfigDict) -> LoraConfig | None:
    """The adapters of a LoRA update (``lora.rank`` > 0), None for a full-weight update; seeded by ``seed``."""
    lc = cfg.lora
    if not lc.rank:
        return None
    try:
        return LoraConfig(rank=lc.rank, alpha=float(lc.alpha), targets=tuple(lc.targets), dropout=float(lc.dropout),
                          seed=cfg.seed)
    except ValueError as e:  # its messages name the lora.* key
        raise ConfigError(f"config key {e}") from e


def build_update_trainer(cfg: ml_collections.ConfigDict, mcfg: QwenConfig, mesh: Mesh) -> Trainer:
    """The jitted update step (of the adapters alone with ``lora.rank`` > 0). Log-probs at the sampling temperature
    (TRL); greedy rollouts train at T = 1."""
    return Trainer(mcfg, build_loss_config(cfg), build_optim_config(cfg), mesh=mesh, lora=build_lora_config(cfg),
                   temperature=cfg.rollout.temperature or 1.0, micro_batches=cfg.optim.micro_batches,
                   chunk_size=cfg.loss.logprob_chunk)
