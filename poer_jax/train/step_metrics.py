"""One training step's rollout metrics, over the whole global batch (every process's questions).

TRL names (``reward``, ``reward_std``, ``rewards/<fn>/mean``, ``completions/*``) plus POER's own
(``tokens/prefilled``, ``tokens/decoded``, ``tokens/decoded_full_equiv``, ``truncation/*``, ``time/*``).
On several processes the per-sample arrays are gathered first, so every number is the one a single
process holding the whole batch would report; times are the slowest process's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poer_jax.system.multihost import ProcessRows
from poer_jax.train.reward_pool import RewardResult
from poer_jax.train.rollout import Rollout

COUNTS = ("prefilled", "decoded", "full_equiv")
TIMES = ("rollout_s", "reward_s")


def gather_reward_result(res: RewardResult, rows: ProcessRows) -> RewardResult:
    """All processes' rewards as one result (rows in process order; counts summed)."""
    if not rows.multihost:
        return res
    def summed(counts: dict[str, int]) -> dict[str, int]:
        total = rows.gather(np.asarray([[counts[n] for n in res.names]], np.int64)).sum(axis=0)
        return {n: int(c) for n, c in zip(res.names, total, strict=True)}

    cut = int(rows.gather(np.asarray([res.deadline_cut], np.int64)).sum())
    mask = res.non_finite_mask if res.non_finite_mask is not None else np.zeros(res.per_function.shape, bool)
    mask = rows.gather(mask)
    return RewardResult(names=res.names, weights=res.weights, per_function=rows.gather(res.per_function),
                        total=rows.gather(res.total), timeouts=summed(res.timeouts), errors=summed(res.errors),
                        nones=summed(res.nones), first_errors=res.first_errors, deadline_cut=cut,
                        non_finite=summed({n: res.non_finite.get(n, 0) for n in res.names}),
                        non_finite_mask=mask if mask.any() else None)


def rollout_metrics(r: Rollout, raw: np.ndarray, shaped: np.ndarray, rewards: RewardResult, info: dict[str, Any],
                    rows: ProcessRows) -> dict[str, float]:
    """Metrics of the step's kept groups ``r`` (raw / shaped rewards [B, G]); ``rewards``: the last sampling
    attempt's reward functions (gathered); ``info``: this process's token counts and times."""
    G = r.group_size
    raw, shaped = rows.gather(raw), rows.gather(shaped)
    lengths = rows.gather(r.response_lengths)
    continuation = rows.gather(np.asarray([len(c) for c in r.continuation_ids], np.int64))
    finish = rows.gather(r.finish_reason)
    counts = rows.gather(np.asarray([[info[k] for k in COUNTS]], np.int64)).sum(axis=0)
    times = rows.gather(np.asarray([[info[k] for k in TIMES]], np.float64)).max(axis=0)
    m: dict[str, Any] = rewards.metrics()  # rewards/non_finite: NaN and inf values the functions returned
    m.update({
        "reward": float(raw.mean()),
        "reward_std": float(raw.std(axis=1, ddof=1).mean()) if G > 1 else 0.0,
        "reward_shaped": float(shaped.mean()),
        "frac_reward_zero_std": float((shaped.std(axis=1) == 0).mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float((finish == 2).mean()),
        "completions/mean_continuation_length": float(continuation.mean()),
        "tokens/prefilled": int(counts[0]),
        "tokens/decoded": int(counts[1]),
        "tokens/decoded_full_equiv": int(counts[2]),
        "truncation/mean_m": float(rows.gather(r.truncation_m).mean()),
        "truncation/mean_L": float(rows.gather(r.truncation_L).mean()),
        "time/rollout_s": float(times[0]),
        "time/reward_s": float(times[1]),
        "tokens/decoded_per_s": float(counts[1] / max(times[0], 1e-9)),
    })
    for k, v in info.items():
        if k.startswith("dynamic_sampling/"):
            m[k] = float(rows.gather(np.asarray([v], np.float64)).mean())
    return m
