"""POER's side of the run from the config: the truncation rule (Eq. 3-4) and the empty cache pool (one row per
question, Eq. 1), created in place with the pool's sharding, or abstract (the plan) with the same shardings."""

from __future__ import annotations

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax import poer


def build_truncation(cfg: ml_collections.ConfigDict) -> poer.TruncationConfig:
    """The truncation rule of ``cache.*`` (Eq. 3-4) for completions of up to ``rollout.max_completion_len``."""
    c = cfg.cache
    return poer.TruncationConfig(max_completion_len=cfg.rollout.max_completion_len, limit=c.truncation,
                                 max_truncation=c.max_truncation, fraction=float(c.truncation_fraction),
                                 mode=c.truncation_mode, budget=c.budget,
                                 max_continuation=cfg.rollout.max_continuation_len)


def build_empty_pool(num_questions: int, max_len: int, pad_id: int, mesh: Mesh, *,
                     abstract: bool = False) -> poer.CachePool:
    """An empty cache pool (one row per question) with the pool's sharding on ``mesh``: created in place, or
    (``abstract``) its ``jax.ShapeDtypeStruct``s from the same program, for the plan."""

    def empty() -> poer.CachePool:
        return poer.create(num_questions, max_len, pad_id)

    make = jax.jit(empty, out_shardings=poer.pool_sharding(jax.eval_shape(empty), mesh))
    return jax.eval_shape(make) if abstract else make()
