"""A short RL run from the arithmetic config's committed warm start, as its own process:
``python -m tests.learning_run OUT.json [KEY=VALUE ...]`` writes the held-out correctness before and after
(``{"before": [[...]], "after": [[...]]}``, problems x samples) for ``tests/test_toy_demo.py`` to test.

Its own process so that its programs compile at XLA's default optimisation level: the suite compiles at -O0
(tests/conftest.py), right for the many small programs compiled once and run a few times, but this run executes
the same update and sampler programs 40 times, and measured alone on the 2-core AMD EPYC its steps took 1.25 s at
-O0 against 0.62 s at -O2 (the whole run 99 s -> ~70 s, the same accuracies to the bit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.helpers_runs import ARITHMETIC_WARM_START, ROOT  # committed; the command that remakes it is there


def held_out(trainer, k: int) -> list[list[float]]:
    """Each held-out problem's k samples graded (problems x k), from a fixed key."""
    import jax
    import numpy as np

    from poer_jax.eval.evaluator import evaluate

    ep = trainer.eval_prompts
    rows = ep.rows(range(len(ep)))
    res = evaluate(trainer.sampler, trainer.tokenizer, list(ep.ids), [r.get("solution") for r in rows],
                   [r.get("answer") for r in rows], k=k, max_new_tokens=trainer.cfg.eval.max_new_tokens,
                   sampling=trainer.eval_sampling, key=jax.random.key(123), grader=trainer.grader)
    return np.asarray(res.correct, np.float64).tolist()


def main(out: Path, extra: list[str]) -> None:
    from poer_jax.system.config import apply_overrides, load_config_file, validate
    from poer_jax.train.loop import PoerTrainer

    cfg = validate(apply_overrides(load_config_file(ROOT / "configs" / "arithmetic.py"), [
        f"workdir={out.parent / 'toy'}", f"warm_start.path={ARITHMETIC_WARM_START}", "toy.num_train=1000",
        "toy.num_test=160", "train.max_steps=40", "eval.every=0", "train.checkpoint_every=1000",
        "train.export_final=false", "mesh.num_devices=1", *extra]))
    trainer = PoerTrainer(cfg)
    try:
        before = held_out(trainer, k=8)
        while trainer.step < cfg.train.max_steps:
            trainer.train_step()
        after = held_out(trainer, k=8)
    finally:
        trainer.close()
    out.write_text(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":  # the reward pool's worker processes import this module again: run only here
    main(Path(sys.argv[1]), sys.argv[2:])
