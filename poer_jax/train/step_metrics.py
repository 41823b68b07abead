"""One training step's rollout metrics, over the whole global batch (every process's questions).

TRL names (``reward``, ``reward_std``, ``rewards/<fn>/mean``, ``completions/*``) plus POER's own
(``tokens/prefilled``, ``tokens/decoded``, ``tokens/decoded_full_equiv``, ``truncation/*``, ``time/*``).
On several processes the per-sample arrays are gathered first, so every number is the one a single
process holding the whole batch would report; times are the slowest process's.

The rollout's critical path (``rollout/*``, over every sampler call of the step, dynamic sampling's extra
batches included): a batched decode runs until its longest sample stops, so its time follows the decode
steps, not the tokens.

  rollout/decode_steps            decode loop iterations (summed over the step's calls; the most of any process)
  rollout/continuation_p50 / _p95 / _max   tokens sampled per continuation (the first one from prefill)
  rollout/row_utilisation         decode-step tokens / rows the decode steps computed, summed over calls
  time/prefill_s, time/decode_s   the sampler's prefill and decode wall time; time/rollout_host_s the rest of
                                  time/rollout_s (truncation, planning, building prompts and outputs)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poer_jax.system.multihost import ProcessRows
from poer_jax.train.reward_pool import RewardResult
from poer_jax.train.rollout import Rollout

COUNTS = ("prefilled", "decoded", "full_equiv")
TIMES = ("rollout_s", "reward_s")
PATH_TIMES = ("prefill_s", "decode_s")


def critical_path_info() -> dict[str, Any]:
    """The per-step accumulators ``add_critical_path`` fills (``info`` of the training loop)."""
    return {"decode_steps": 0, "decode_row_steps": 0, "decode_step_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0,
            "continuation_lengths": np.zeros((0,), np.int64)}


def add_critical_path(info: dict[str, Any], r: Rollout) -> None:
    """Add one sampler call's decode steps, row-steps, decode-step tokens, times and continuation lengths."""
    for k in ("decode_steps", "decode_row_steps", "decode_step_tokens", "prefill_s", "decode_s"):
        info[k] += getattr(r, k)
    lengths = np.asarray([len(c) for c in r.continuation_ids], np.int64)
    info["continuation_lengths"] = np.concatenate([info["continuation_lengths"], lengths])


def critical_path_metrics(info: dict[str, Any], rows: ProcessRows, rollout_s: float) -> dict[str, float]:
    """``rollout/*`` and the prefill / decode / host split of ``rollout_s`` (module docstring) over all processes:
    steps and times are the slowest process's (processes decode side by side), row-steps and tokens summed."""
    from poer_jax.sampler.batch_sampler import row_utilisation

    lengths = rows.gather(info["continuation_lengths"])
    steps = int(rows.gather(np.asarray([info["decode_steps"]], np.int64)).max())
    row_steps, tokens = rows.gather(np.asarray([[info["decode_row_steps"], info["decode_step_tokens"]]],
                                               np.int64)).sum(axis=0)
    prefill_s, decode_s = rows.gather(np.asarray([[info[k] for k in PATH_TIMES]], np.float64)).max(axis=0)
    has = lengths.size > 0
    return {
        "rollout/decode_steps": steps,
        "rollout/continuation_p50": float(np.percentile(lengths, 50)) if has else 0.0,
        "rollout/continuation_p95": float(np.percentile(lengths, 95)) if has else 0.0,
        "rollout/continuation_max": int(lengths.max()) if has else 0,
        "rollout/row_utilisation": row_utilisation(int(tokens), int(row_steps)),
        "time/prefill_s": float(prefill_s),
        "time/decode_s": float(decode_s),
        "time/rollout_host_s": max(0.0, rollout_s - float(prefill_s) - float(decode_s)),
    }


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
    if "decode_steps" in info:
        m.update(critical_path_metrics(info, rows, float(times[0])))
    for k, v in info.items():
        if k.startswith("dynamic_sampling/"):
            m[k] = float(rows.gather(np.asarray([v], np.float64)).mean())
    return m
