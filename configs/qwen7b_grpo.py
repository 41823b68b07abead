"""GRPO baseline for configs/qwen7b.py: identical except full rollouts (no cache pool, nothing truncated).

Length-aware shaping stays as in the POER config so that only the rollout strategy differs; set
--config.reward.length_aware=false for the paper's plain GRPO reward.
"""

from pathlib import Path

from poer_jax.system.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("qwen7b.py"))
    c.workdir = "runs/qwen7b_grpo"
    c.rollout.strategy = "full"
    return c
