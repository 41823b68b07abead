"""Make the supervised warm start of a config and save it as an HF directory (the demo's committed one).

    PYTHONPATH=. python scripts/warm_start.py --config=configs/toy.py [--out DIR] [--rows 8000] [--eval-k 4]
        [--config.KEY=VALUE ...]

Generates the config's built-in task and tiny model (as ``python -m poer_jax.train`` does), runs
``warm_start.steps`` supervised steps on the reference solutions of ``--rows`` freshly generated problems
(another seed than RL's rows, none of them a held-out problem), and writes the model, its
tokenizer and ``warm_start.json`` (steps, losses, held-out accuracy) to ``--out`` (default: the config's
``warm_start.path``), replacing what is there. The held-out accuracy (avg@k at the config's evaluation
temperature, greedy too) is what RL then starts from. Deterministic for a given config on one machine type.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _warm_start_rows(cfg: Any, rows: int, path: Path) -> Path:
    """``rows`` problems of the config's toy task for the warm start, from seed + 1: none is a held-out one."""
    from poer_jax.tasks import make_task_splits
    from poer_jax.tasks.toy import write_jsonl
    from poer_jax.train.data import load_dataset_file

    t = cfg.toy
    train, _ = make_task_splits(t.task, rows, 0, seed=cfg.seed + 1, max_value=t.max_value,
                                min_operands=t.min_operands, max_operands=t.max_operands,
                                word_problem_fraction=t.word_problem_fraction)
    held_out = {r["problem"] for r in load_dataset_file(cfg.data.eval_path).rows} if cfg.data.eval_path else set()
    return write_jsonl([r for r in train if r["problem"] not in held_out], path)


def make_warm_start(cfg: Any, out: Path, eval_k: int = 4, rows: int = 0) -> dict[str, Any]:
    """Run the warm start of ``cfg`` into ``out``; returns the record written to ``out/warm_start.json``.

    ``rows`` > 0 (toy tasks): train on that many freshly generated problems instead of the RL training set,
    so that a long warm start does not memorise the questions RL then trains on."""
    import jax

    from poer_jax.model.sharding import make_mesh
    from poer_jax.train import builders, setup
    from poer_jax.train.config import apply_overrides, validate
    from poer_jax.train.loop import PoerTrainer

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="warm_start_") as tmp:
        base = validate(apply_overrides(cfg, [f"workdir={tmp}", "warm_start.path=None"]))
        if base.warm_start.steps < 1:
            raise ValueError("warm_start.steps must be >= 1 to make a warm start")
        base = setup.prepare_toy(base) if base.toy.enabled else base
        rl_train = base.data.train_path
        if rows > 0:
            if not cfg.toy.enabled:
                raise ValueError("--rows needs a config with a built-in task (toy.enabled)")
            base.data.train_path = str(_warm_start_rows(base, rows, Path(tmp) / "warm_start_rows.jsonl"))
        text = builders.build_text(base)
        prompts = builders.build_prompts(base, text.tokenizer).train
        targets = [setup.warm_start_target(r, base) for r in prompts.rows(range(len(prompts)))]
        staged = Path(tmp) / "out"
        t0 = time.perf_counter()
        setup.run_warm_start(base, text.tokenizer, list(prompts.ids), targets, make_mesh({"fsdp": -1},
                             jax.devices()[:1]), out_dir=staged)
        seconds = time.perf_counter() - t0
        losses = json.loads((staged / "warm_start_losses.json").read_text())
        record: dict[str, Any] = {"steps": base.warm_start.steps, "learning_rate": base.warm_start.learning_rate,
                                  "batch_size": base.warm_start.batch_size, "rows": len(prompts),
                                  "seconds": round(seconds, 1), "final_loss": losses[-1],
                                  "task": base.toy.task if base.toy.enabled else None}
        if eval_k > 0 and base.eval.enabled:
            over = [f"warm_start.path={staged}", "warm_start.steps=0", f"eval.num_samples={eval_k}",
                    f"data.train_path={rl_train}", "train.export_final=false", "resume=false",
                    "mesh.num_devices=1", "cache.init=solutions"]
            trainer = PoerTrainer(validate(apply_overrides(base, over)))
            try:
                record["held_out"] = {f"temperature_{base.eval.temperature}": trainer.evaluate()["eval/accuracy"]}
                greedy = trainer.eval_sampling.__class__(temperature=0.0)
                trainer.eval_sampling = greedy
                record["held_out"]["greedy"] = trainer.evaluate()["eval/accuracy"]
            finally:
                trainer.rewards.close()
                if trainer.grader is not trainer.rewards:
                    trainer.grader.close()
                trainer.checkpointer.close()
                if trainer.metrics is not None:
                    trainer.metrics.close()
        (staged / "warm_start.json").write_text(json.dumps(record, indent=2) + "\n")
        (staged / "warm_start_losses.json").unlink()
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(out))
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default: the config's warm_start.path")
    ap.add_argument("--eval-k", type=int, default=4, help="samples per held-out problem (0: no evaluation)")
    ap.add_argument("--rows", type=int, default=8000,
                    help="fresh problems to train on (toy tasks; 0: the config's RL training rows)")
    args, rest = ap.parse_known_args(argv)

    from poer_jax.train.config import ConfigError, config_from_argv

    try:
        cfg = config_from_argv(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (Path(cfg.warm_start.path) if cfg.warm_start.path else None)
    if out is None:
        ap.error("give --out DIR (the config has no warm_start.path)")
    record = make_warm_start(cfg, out, eval_k=args.eval_k, rows=args.rows if cfg.toy.enabled else 0)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps(record, indent=2))
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
