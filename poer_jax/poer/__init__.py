"""POER experience replay: cache pool (Eq. 1-2), truncation (Eq. 3-4) and cache update (Eq. 9),
and the length-aware reward (Eq. 10).

Owns: the cache pool of answers and the paper's rules over it, as pure, jit-friendly functions.
May import: ``model``, ``tasks`` and the leaf modules (``jsonl``); not ``sampler``, ``rl`` or ``rewards`` (its
siblings), nor anything above.
"""

from poer_jax.poer.cache_init import from_token_arrays, from_token_lists, load_answers_file
from poer_jax.poer.cache_pool import (
    CachePool,
    create,
    from_state_dict,
    insert,
    pool_sharding,
    shard_pool,
    to_state_dict,
)
from poer_jax.poer.cache_update import (
    UpdateResult,
    best_response,
    cache_metrics,
    choose_responses,
    replayed_fraction,
    update,
)
from poer_jax.poer.length_reward import LENGTH_REWARD_VARIANTS, length_aware_reward
from poer_jax.poer.truncation import (
    LIMIT_MODES,
    Truncation,
    TruncationConfig,
    join_prefix_continuation,
    prefix_tokens,
    truncate,
    truncation_metrics,
)

__all__ = [
    "LENGTH_REWARD_VARIANTS",
    "LIMIT_MODES",
    "CachePool",
    "Truncation",
    "TruncationConfig",
    "UpdateResult",
    "best_response",
    "cache_metrics",
    "replayed_fraction",
    "choose_responses",
    "create",
    "from_state_dict",
    "from_token_arrays",
    "from_token_lists",
    "insert",
    "join_prefix_continuation",
    "length_aware_reward",
    "load_answers_file",
    "pool_sharding",
    "prefix_tokens",
    "shard_pool",
    "to_state_dict",
    "truncate",
    "truncation_metrics",
    "update",
]
