"""The CPU demo learns: configs/toy.py, shortened, raises held-out accuracy above the warm start's by a
margin that chance does not explain (paired test over problems, fixed seed)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from poer_jax.train.config import apply_overrides, load_config_file, validate

ROOT = Path(__file__).resolve().parents[1]


def _held_out(trainer, k: int) -> np.ndarray:
    from poer_jax.eval.evaluator import evaluate

    ep = trainer.eval_prompts
    rows = ep.rows(range(len(ep)))
    res = evaluate(trainer.sampler, trainer.tokenizer, list(ep.ids), [r.get("solution") for r in rows],
                   [r.get("answer") for r in rows], k=k, max_new_tokens=trainer.cfg.eval.max_new_tokens,
                   sampling=trainer.eval_sampling, key=jax.random.key(123), grader=trainer.grader)
    return res.correct.astype(np.float64)  # [problems, k]


@pytest.mark.slow
def test_toy_config_learns(tmp_path):
    from scipy import stats

    from poer_jax.train.loop import PoerTrainer

    cfg = validate(apply_overrides(load_config_file(ROOT / "configs" / "toy.py"), [
        f"workdir={tmp_path / 'toy'}", "toy.num_train=1000", "toy.num_test=160", "train.max_steps=40",
        "eval.every=0", "train.checkpoint_every=1000", "train.export_final=false",
        "mesh.num_devices=1"]))  # conftest fakes 8 CPU devices; the demo runs on one
    trainer = PoerTrainer(cfg)
    try:
        before = _held_out(trainer, k=8)
        while trainer.step < cfg.train.max_steps:
            trainer.train_step()
        after = _held_out(trainer, k=8)
    finally:
        trainer.rewards.close()
        trainer.checkpointer.close()
        trainer.metrics.close()
    gain = after.mean() - before.mean()
    # one-sided paired t-test over problems (each problem's accuracy over its 8 samples)
    p = stats.ttest_rel(after.mean(1), before.mean(1), alternative="greater").pvalue
    print(f"held-out accuracy {before.mean():.3f} -> {after.mean():.3f} (p = {p:.2g})")
    assert 0.05 < before.mean() < 0.8, "the warm start should be right sometimes and wrong often"
    assert gain > 0.03 and p < 0.01, (before.mean(), after.mean(), p)
