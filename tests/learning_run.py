"""Short RL runs from the arithmetic config's committed warm start, in a process of their own:
``python -m tests.learning_run OUT.json`` trains the full weights and, from the same start, rank-8 LoRA adapters
(``FULL``, ``LORA``: 80 and 60 steps), and writes the held-out correctness (320 problems x 8 samples) before and
after each (``{"before": [[...]], "after": {"full": [[...]], "lora": [[...]]}}``, problems x samples) for
``tests/test_toy_demo.py`` and ``tests/test_lora_run.py``; ``python -m tests.learning_run OUT.json KEY=VALUE ...``
trains one run with those overrides (``"after": {"run": ...}``).

The start is graded once: the LoRA run starts from the same weights (B = 0 adds exactly nothing,
tests/test_lora.py) and grades with the same key, so its "before" is the full run's.

Its own process so that its programs compile at XLA's default optimisation level: the suite compiles at -O0
(tests/conftest.py), right for the many small programs compiled once and run a few times, but this run executes
the same update and sampler programs 60-80 times, and measured alone on the 2-core AMD EPYC its steps took 1.25 s at
-O0 against 0.62 s at -O2 (the whole run 99 s -> ~70 s, the same accuracies to the bit)."""

from __future__ import annotations

import json
import sys
import time
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


# The full weights at half the config's learning rate for twice its steps: 5e-5 x 80 passed the test on each of seeds
# 0-5, the config's 1e-4 x 40 on 4 of them (its end point is noisier; docs/lora.md)
FULL = ["optim.learning_rate=5e-5", "train.max_steps=80"]
# every projection, an adapter's learning rate: 5e-4 for 60 steps passed the test on each of seeds 0-5, 1e-3 for 40
# steps on 2 of them (docs/lora.md: a single run's end point is noisy at the larger rate)
LORA = ["lora.rank=8", "lora.alpha=16", "optim.learning_rate=5e-4", "train.max_steps=60"]


def train(out: Path, name: str, extra: list[str], grade_start: bool) -> tuple[list | None, list]:
    """One run (40 steps unless ``extra`` says otherwise): the held-out correctness at the start (when asked) and at
    the end."""
    from poer_jax.system.config import apply_overrides, load_config_file, validate
    from poer_jax.train.loop import PoerTrainer

    cfg = validate(apply_overrides(load_config_file(ROOT / "configs" / "arithmetic.py"), [
        f"workdir={out.parent / name}", f"warm_start.path={ARITHMETIC_WARM_START}", "toy.num_train=1000",
        "toy.num_test=320", "train.max_steps=40", "eval.every=0", "train.checkpoint_every=1000",
        "train.export_final=false", "mesh.num_devices=1",
        "train.compilation_cache_dir=", *extra]))  # no persistent cache: its programs are this process's own
    t0 = time.perf_counter()
    trainer = PoerTrainer(cfg)
    try:
        t1 = time.perf_counter()
        before = held_out(trainer, k=8) if grade_start else None
        t2 = time.perf_counter()
        while trainer.step < cfg.train.max_steps:
            trainer.train_step()
        t3 = time.perf_counter()
        after = held_out(trainer, k=8)
        print(f"{name}: build {t1 - t0:.1f} s, grade start {t2 - t1:.1f} s, {cfg.train.max_steps} steps "
              f"{t3 - t2:.1f} s, grade end {time.perf_counter() - t3:.1f} s", file=sys.stderr, flush=True)
        return before, after
    finally:
        trainer.close()


def main(out: Path, extra: list[str]) -> None:
    runs = {"run": extra} if extra else {"full": FULL, "lora": LORA}
    before, after = None, {}
    for name, overrides in runs.items():
        start, after[name] = train(out, name, overrides, grade_start=before is None)
        before = before if start is None else start
    out.write_text(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":  # the reward pool's worker processes import this module again: run only here
    main(Path(sys.argv[1]), sys.argv[2:])
