"""RL math: group-relative advantages, clipped policy losses, reward shaping, dynamic sampling, the update step
(``update``: log-probs, gradients, AdamW on a mesh; ``lora``: the adapters-only update on a frozen base) and the
supervised warm start's update (``supervised``).

Owns: everything that turns a scored rollout into new weights, and the update's programs for the plan.
May import: ``model``, ``tasks`` and the leaf modules (``program_spec``); not ``sampler``, ``poer`` or ``rewards``
(its siblings), nor anything above.
"""

from poer_jax.rl.advantages import SCALE_MODES, group_advantages, group_mean_std
from poer_jax.rl.batch import RolloutBatch, bucket_length, build_rollout_batch, shard_batch
from poer_jax.rl.dynamic_sampling import (
    DynamicSampler,
    DynamicSamplingError,
    groups_with_spread,
    select_groups,
)
from poer_jax.rl.logprobs import token_logprobs, token_logprobs_from_hidden
from poer_jax.rl.losses import (
    AGGREGATIONS,
    LOSS_PRESETS,
    LossConfig,
    LossTerms,
    accumulate,
    completion_mask,
    compute_loss,
    finalize,
    get_loss_config,
    get_loss_fn,
    get_objective,
    register_objective,
)
from poer_jax.rl.optim import OptimConfig, decay_mask, make_optimizer, make_schedule
from poer_jax.rl.reward_shaping import apply_overlong_penalty, overlong_penalty
from poer_jax.rl.update import (
    SAMPLER_DIFF,
    Trainer,
    TrainState,
    UpdateConfig,
    aggregate_metrics,
    compute_logps_impl,
    create_train_state,
    loss_and_grads,
    micro_batch_terms,
    opt_state_shardings,
    update_step,
)

__all__ = [
    "AGGREGATIONS",
    "LOSS_PRESETS",
    "SCALE_MODES",
    "DynamicSampler",
    "DynamicSamplingError",
    "LossConfig",
    "LossTerms",
    "accumulate",
    "apply_overlong_penalty",
    "completion_mask",
    "compute_loss",
    "finalize",
    "get_loss_config",
    "get_loss_fn",
    "get_objective",
    "group_advantages",
    "group_mean_std",
    "groups_with_spread",
    "overlong_penalty",
    "register_objective",
    "select_groups",
]

__all__ += [
    "SAMPLER_DIFF",
    "OptimConfig",
    "RolloutBatch",
    "TrainState",
    "Trainer",
    "UpdateConfig",
    "aggregate_metrics",
    "bucket_length",
    "build_rollout_batch",
    "compute_logps_impl",
    "create_train_state",
    "decay_mask",
    "loss_and_grads",
    "make_optimizer",
    "make_schedule",
    "micro_batch_terms",
    "opt_state_shardings",
    "shard_batch",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "update_step",
]
