"""The run's held-out evaluation: avg@k / pass@k of the held-out problems, split over processes.

Each process samples and grades its share of the problems (``share = ceil(n / processes)`` consecutive
problems; padding rows after the last), and the [problems, k] correctness matrix is gathered on all of them
for the paired tests. With a built-in task on one process the metrics also give the fraction of completions
whose first error is each of the task's error kinds (``eval/error/<kind>``, ``tasks.error_fractions``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poer_jax.sampler.pages import cdiv


def evaluate_held_out(trainer: Any) -> tuple[dict[str, float], np.ndarray]:
    """(metrics, correct [problems, k]) of the trainer's current weights on its held-out prompts."""
    from poer_jax.eval.evaluator import EvalResult, eval_key, evaluate
    from poer_jax.tasks import error_fractions

    cfg, ep, rows_of = trainer.cfg, trainer.eval_prompts, trainer.rows
    n, k = len(ep), cfg.eval.num_samples
    share = cdiv(n, rows_of.count)
    mine = np.arange(rows_of.index * share, min(n, (rows_of.index + 1) * share))
    correct, lengths, seconds = np.zeros((share, k), bool), np.zeros((share, k), np.int32), 0.0
    errors: dict[str, float] = {}
    if mine.size:
        rows = ep.rows(mine)
        res = evaluate(trainer.sampler, trainer.tokenizer, [ep.ids[i] for i in mine],
                       [r.get("solution") for r in rows], [r.get("answer") for r in rows], k=k,
                       max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_completion_len,
                       sampling=trainer.eval_sampling, key=eval_key(cfg.seed), grader=trainer.grader,
                       first_index=int(mine[0]))
        correct[: mine.size], lengths[: mine.size], seconds = res.correct, res.lengths, res.seconds
        if cfg.toy.enabled and rows_of.count == 1:
            errors = error_fractions(cfg.toy.task, [r["problem"] for r in rows], res.completions)
    all_correct = rows_of.gather(correct)[:n]
    res = EvalResult(correct=all_correct, completions=[], lengths=rows_of.gather(lengths)[:n],
                     seconds=rows_of.max(seconds))
    return res.metrics() | {f"eval/error/{e}": f for e, f in errors.items()}, all_correct
