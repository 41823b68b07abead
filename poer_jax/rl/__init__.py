"""RL math: group-relative advantages, clipped policy losses, reward shaping, dynamic sampling."""

from poer_jax.rl.advantages import SCALE_MODES, group_advantages, group_mean_std
from poer_jax.rl.dynamic_sampling import (
    DynamicSampler,
    DynamicSamplingError,
    groups_with_spread,
    select_groups,
)
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
from poer_jax.rl.reward_shaping import apply_overlong_penalty, overlong_penalty

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
