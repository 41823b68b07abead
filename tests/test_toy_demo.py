"""The README's demo (configs/toy.py) runs in POER's regime from a warm start that RL can improve, and RL from a
warm start learns: the short-answer config (configs/arithmetic.py), shortened and started from its committed warm
start, raises held-out accuracy above the warm start's by a margin that chance does not explain (paired test over
problems, fixed seed). The demo's own 100-step rise is measured, not tested (it takes ~10 minutes): README,
docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from poer_jax.system.config import apply_overrides, load_config_file, validate
from tests.helpers_runs import LEARNING

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_in_poers_regime_from_a_warm_start_rl_can_improve(tmp_path):
    """L about 10 % of an answer, the paper's continuation budget, returning questions, a right prefix for every
    question, a warm start right on about half the held-out problems, and continuations of ~L tokens."""
    from poer_jax.train.loop import PoerTrainer

    cfg = validate(apply_overrides(load_config_file(ROOT / "configs" / "toy.py"), [
        f"workdir={tmp_path / 'demo'}", "toy.num_test=64", "eval.num_samples=2", "train.max_steps=2", "eval.every=0",
        "train.checkpoint_every=1000",
        "train.export_final=false", "mesh.num_devices=1"]))  # conftest fakes 8 CPU devices; the demo runs on one
    demo = load_config_file(ROOT / "configs" / "toy.py")
    assert demo.rollout.strategy == "poer" and demo.cache.budget == "max_length"
    assert demo.train.max_steps * demo.data.questions_per_step >= 4 * demo.toy.num_train, "questions come back"
    trainer = PoerTrainer(cfg)
    try:
        lengths = np.asarray(trainer.pool.lengths)
        assert (lengths > 0).all(), "the pool starts with an answer for every question"
        proportion = cfg.cache.max_truncation / lengths.mean()
        assert 0.07 <= proportion <= 0.15, proportion  # the paper: 300 / ~2,700
        start = trainer.evaluate()["eval/accuracy"]
        assert 0.3 <= start <= 0.65, start  # committed warm start: 0.475
        decoded = [trainer.train_step()["tokens/decoded"] for _ in range(2)]
    finally:
        trainer.close()
    per_sample = np.mean(decoded) / (cfg.data.questions_per_step * cfg.rollout.group_size)
    # continuations stop at EOS about m ~ U{0..L} tokens after the cut (a whole answer is ~200 tokens)
    assert per_sample <= 1.5 * cfg.cache.max_truncation, per_sample


@pytest.mark.slow
@pytest.mark.xdist_group(LEARNING)
def test_arithmetic_config_learns(learning_runs):
    """80 POER steps at learning rate 5e-5 from the committed warm start (tests/learning_run.py's ``FULL``), in a
    process of its own compiled at XLA's default level (tests/learning_run.py says why)."""
    from scipy import stats

    before, after = np.asarray(learning_runs["before"]), np.asarray(learning_runs["after"]["full"])
    assert before.shape == after.shape == (320, 8)
    gain = after.mean() - before.mean()
    # one-sided paired t-test over problems (each problem's accuracy over its 8 samples)
    p = stats.ttest_rel(after.mean(1), before.mean(1), alternative="greater").pvalue
    print(f"held-out accuracy {before.mean():.3f} -> {after.mean():.3f} (p = {p:.2g})")
    assert 0.05 < before.mean() < 0.8, "the warm start should be right sometimes and wrong often"
    assert gain > 0.03 and p < 0.01, (before.mean(), after.mean(), p)
