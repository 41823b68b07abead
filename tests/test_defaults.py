"""One source of defaults: every library default that the command line also sets has the same value there, so
a run built from the library and one from ``python -m poer_jax.train`` do the same thing unless told otherwise."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from poer_jax import poer
from poer_jax.rl import LossConfig
from poer_jax.rl.optim import OptimConfig
from poer_jax.rl.update import UpdateConfig
from poer_jax.system.config import default_config


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _kwdefaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


CFG = default_config()
PAIRS = [
    *[(f"optim.{k}", OptimConfig, k) for k in ("learning_rate", "b1", "b2", "eps", "weight_decay", "max_grad_norm",
                                              "warmup_steps", "min_lr_ratio")],
    ("loss.logprob_chunk", UpdateConfig, "chunk_size"),
    ("optim.micro_batches", UpdateConfig, "micro_batches"),
    *[(f"loss.{k}", LossConfig, k) for k in ("objective", "epsilon_low", "epsilon_high", "dual_clip", "beta",
                                            "aggregation")],
    ("cache.truncation", poer.TruncationConfig, "limit"),
    ("cache.max_truncation", poer.TruncationConfig, "max_truncation"),
    ("cache.truncation_fraction", poer.TruncationConfig, "fraction"),
    ("cache.truncation_mode", poer.TruncationConfig, "mode"),
    ("cache.budget", poer.TruncationConfig, "budget"),
    ("reward.alpha", poer.length_aware_reward, "alpha"),
    ("reward.r_min", poer.length_aware_reward, "r_min"),
    ("reward.r_max", poer.length_aware_reward, "r_max"),
    ("reward.length_variant", poer.length_aware_reward, "variant"),
    ("cache.epsilon", poer.update, "epsilon"),
    ("cache.update_mode", poer.update, "mode"),
]


@pytest.mark.parametrize(("key", "owner", "name"), PAIRS, ids=[p[0] for p in PAIRS])
def test_library_and_command_line_defaults_agree(key, owner, name):
    lib = _defaults(owner) if dataclasses.is_dataclass(owner) else _kwdefaults(owner)
    section, leaf = key.split(".")
    assert lib[name] == CFG[section][leaf], f"{owner.__name__}.{name} = {lib[name]!r}, --config.{key} = " \
                                            f"{CFG[section][leaf]!r}"
