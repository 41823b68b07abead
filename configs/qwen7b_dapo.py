"""DAPO baseline for configs/qwen7b.py: full rollouts, clip-higher, token-mean, overlong shaping, dynamic sampling."""

from pathlib import Path

from poer_jax.system.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("qwen7b.py"))
    c.workdir = "runs/qwen7b_dapo"
    c.rollout.strategy = "full"
    c.loss.epsilon_low = 0.2
    c.loss.epsilon_high = 0.28
    c.loss.aggregation = "token_mean"
    c.loss.beta = 0.0
    c.reward.overlong_buffer = 512
    c.reward.overlong_penalty = 1.0
    c.reward.dynamic_sampling = True
    c.reward.max_sampling_attempts = 10
    return c
