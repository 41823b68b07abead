"""The run's reward pools from ``reward.*``: the training rewards (weighted, in worker processes with a
deadline), and the accuracy grader of the held-out evaluation (the same pool when it has accuracy)."""

from __future__ import annotations

import ml_collections

from poer_jax.train.reward_pool import RewardPool, RewardSpec


def reward_specs(cfg: ml_collections.ConfigDict) -> list[RewardSpec]:
    weights = cfg.reward.weights or [1.0] * len(cfg.reward.functions)
    specs = []
    for name, w in zip(cfg.reward.functions, weights, strict=True):
        kwargs = {"max_len": cfg.reward.cosine_max_len} if name == "cosine" else {}
        specs.append(RewardSpec(name, float(w), kwargs))
    return specs


def build_rewards(cfg: ml_collections.ConfigDict) -> tuple[RewardPool, RewardPool]:
    """(the reward pool of training, the accuracy grader of evaluation: the same pool when it has accuracy)."""
    rewards = RewardPool(reward_specs(cfg), num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s,
                         on_error=cfg.reward.on_error)
    if "accuracy" in rewards.names:
        return rewards, rewards
    try:
        return rewards, RewardPool(["accuracy"], num_workers=1, timeout_s=cfg.reward.timeout_s, on_error="zero")
    except BaseException:
        rewards.close()
        raise
