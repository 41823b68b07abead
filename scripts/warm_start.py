"""Make the supervised warm start of a config and save it as an HF directory (the demo's committed one).

    PYTHONPATH=. python scripts/warm_start.py --config=configs/toy.py [--out DIR] [--rows 8000]
        [--target-accuracy 0.45] [--eval-every 250] [--config.KEY=VALUE ...]

Generates the config's built-in task and tiny model (as ``python -m poer_jax.train`` does) and runs up to
``warm_start.steps`` supervised steps on the reference solutions of ``--rows`` freshly generated problems
(another seed than the RL rows; none of them a held-out problem). Every ``--eval-every`` steps it samples a
validation set (``--validation`` more fresh problems, 2 samples each at the config's evaluation temperature)
and stops once the validation accuracy reaches ``--target-accuracy``: RL should start from a policy that is
right sometimes and wrong often. Writes the model, its tokenizer and ``warm_start.json`` (steps, loss,
validation curve, and the held-out accuracy RL starts from) to ``--out`` (default: the config's
``warm_start.path``), replacing what is there. Deterministic for a given config on one machine type.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("poer_jax")


def _fresh_rows(cfg: Any, rows: int, seed: int, exclude: set[str], path: Path) -> Path:
    """Up to ``rows`` problems of the config's built-in task from ``seed``, none of them in ``exclude`` (fewer
    where the task's knobs allow fewer distinct problems: all of them but the excluded ones)."""
    from poer_jax.tasks import make_task_splits, task_capacity
    from poer_jax.tasks.toy import write_jsonl

    t = cfg.toy
    capacity = task_capacity(t.task, max_value=t.max_value, min_operands=t.min_operands, max_operands=t.max_operands)
    if capacity is not None and rows > capacity - len(exclude):
        log.info("warm start: the task has %d distinct problems; using %d rows", capacity, capacity)
        rows = capacity
    train, _ = make_task_splits(t.task, rows, 0, seed=seed, max_value=t.max_value, min_operands=t.min_operands,
                                max_operands=t.max_operands, word_problem_fraction=t.word_problem_fraction)
    return write_jsonl([r for r in train if r["problem"] not in exclude], path)


class _Validation:
    """The stopping rule: validation accuracy every few steps, True once it reaches the target."""

    def __init__(self, cfg: Any, text: Any, prompts: Any, target: float, k: int = 2) -> None:
        from poer_jax.train.reward_setup import build_rewards

        self.cfg, self.text, self.prompts, self.target, self.k = cfg, text, prompts, target, k
        self.rows = prompts.rows(range(len(prompts)))
        _, self.grader = build_rewards(cfg)
        self.sampler: Any = None
        self.curve: list[dict[str, float]] = []

    def __call__(self, step: int, params: Any, mcfg: Any) -> bool:
        import jax
        import jax.numpy as jnp

        from poer_jax import system
        from poer_jax.eval.evaluator import evaluate
        from poer_jax.model.sharding import make_mesh

        params = jax.tree.map(jnp.copy, params)  # the warm start donates its parameters to the next step
        if self.sampler is None:
            mesh = make_mesh({"fsdp": -1}, jax.devices()[:1])
            self.sampler, self.local = system.build_sampler(self.cfg, mcfg, mesh, system.ProcessRows(mesh), params,
                                                            self.text, len(self.prompts))
        else:
            self.sampler.update_params(self.local(params))
        res = evaluate(self.sampler, self.text.tokenizer, list(self.prompts.ids),
                       [r.get("solution") for r in self.rows], [r.get("answer") for r in self.rows], k=self.k,
                       max_new_tokens=self.cfg.eval.max_new_tokens or self.cfg.rollout.max_completion_len,
                       sampling=system.sampling_params(self.cfg)[1], key=jax.random.key(7), grader=self.grader)
        acc = float(res.correct.mean())
        self.curve.append({"step": step, "validation_accuracy": acc})
        log.info("warm start step %d: validation accuracy %.3f", step, acc)
        return self.target > 0 and acc >= self.target

    def close(self) -> None:
        self.grader.close()


def make_warm_start(cfg: Any, out: Path, *, rows: int = 8000, validation: int = 64, target: float = 0.0,
                    eval_every: int = 250, eval_k: int = 4) -> dict[str, Any]:
    """Run the warm start of ``cfg`` into ``out``; returns the record written to ``out/warm_start.json``."""
    import jax

    from poer_jax import system
    from poer_jax.model.sharding import make_mesh
    from poer_jax.system.config import apply_overrides, validate
    from poer_jax.system.data import load_dataset_file
    from poer_jax.train.loop import PoerTrainer

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="warm_start_") as tmp:
        base = validate(apply_overrides(cfg, [f"workdir={tmp}", "warm_start.path=None"]))
        if base.warm_start.steps < 1:
            raise ValueError("warm_start.steps must be >= 1 to make a warm start")
        base = system.prepare_toy(base) if base.toy.enabled else base
        rl_train = base.data.train_path
        text = system.build_text(base)
        check = None
        if rows > 0 and base.toy.enabled:
            held_out = {r["problem"] for r in load_dataset_file(base.data.eval_path).rows} if base.data.eval_path \
                else set()
            valid_path = _fresh_rows(base, validation, base.seed + 2, held_out, Path(tmp) / "validation.jsonl")
            exclude = held_out | {r["problem"] for r in load_dataset_file(valid_path).rows}
            base.data.train_path = str(_fresh_rows(base, rows, base.seed + 1, exclude, Path(tmp) / "rows.jsonl"))
            valid_cfg = apply_overrides(base, [f"data.train_path={valid_path}", "data.questions_per_step=1"])
            valid = system.build_prompts(valid_cfg, text.tokenizer).train
            check = _Validation(base, text, valid, target)
        elif rows > 0:
            raise ValueError("--rows needs a config with a built-in task (toy.enabled); use --rows 0")
        prompts = system.build_prompts(base, text.tokenizer).train
        targets = [system.warm_start_target(r, base) for r in prompts.rows(range(len(prompts)))]
        staged = Path(tmp) / "out"
        t0 = time.perf_counter()
        try:
            system.run_warm_start(base, text.tokenizer, list(prompts.ids), targets,
                                  make_mesh({"fsdp": -1}, jax.devices()[:1]), out_dir=staged, callback=check,
                                  callback_every=eval_every if check is not None else 0)
        finally:
            if check is not None:
                check.close()
        seconds = time.perf_counter() - t0
        losses = json.loads((staged / "warm_start_losses.json").read_text())
        record: dict[str, Any] = {
            "task": base.toy.task if base.toy.enabled else None, "rows": len(prompts), "steps": len(losses),
            "max_steps": base.warm_start.steps, "learning_rate": base.warm_start.learning_rate,
            "batch_size": base.warm_start.batch_size, "target_validation_accuracy": target,
            "validation": check.curve if check is not None else [], "final_loss": losses[-1],
            "seconds": round(seconds, 1)}
        if eval_k > 0 and base.eval.enabled and base.data.eval_path:
            over = [f"warm_start.path={staged}", "warm_start.steps=0", f"eval.num_samples={eval_k}",
                    f"data.train_path={rl_train}", "train.export_final=false", "resume=false",
                    "mesh.num_devices=1", "cache.init=solutions"]
            trainer = PoerTrainer(validate(apply_overrides(base, over)))
            try:
                record["held_out_accuracy"] = trainer.evaluate()["eval/accuracy"]
                record["held_out"] = {"problems": len(trainer.eval_prompts), "k": eval_k,
                                      "temperature": base.eval.temperature}
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
    ap.add_argument("--rows", type=int, default=8000,
                    help="fresh problems to train on (built-in tasks; 0: the config's RL training rows)")
    ap.add_argument("--validation", type=int, default=64, help="fresh validation problems (built-in tasks)")
    ap.add_argument("--target-accuracy", type=float, default=0.45,
                    help="stop once the validation accuracy reaches this (0: run all warm_start.steps)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-k", type=int, default=4, help="samples per held-out problem at the end (0: none)")
    args, rest = ap.parse_known_args(argv)
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()  # the test extra's libtpu / CUDA plugin without their hardware: not started

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)

    from poer_jax.system.config import ConfigError, config_from_argv

    try:
        cfg = config_from_argv(rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or (Path(cfg.warm_start.path) if cfg.warm_start.path else None)
    if out is None:
        ap.error("give --out DIR (the config has no warm_start.path)")
    record = make_warm_start(cfg, out, rows=args.rows if cfg.toy.enabled else 0, validation=args.validation,
                             target=args.target_accuracy, eval_every=args.eval_every, eval_k=args.eval_k)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps(record, indent=2))
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
