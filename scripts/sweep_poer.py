"""The accuracy-cost frontier: POER at several truncation lengths L and GRPO, from the same warm start and seeds.

    PYTHONPATH=. python scripts/sweep_poer.py --config=configs/toy.py [--fractions 0.1,0.25,0.5] [--seeds 0]
        [--steps 100] [--eval-steps 0,2,5,10,20,40,60,80,100] [--out docs/results/sweep] [--config.KEY=VALUE ...]

For every seed, runs GRPO (``rollout.strategy=full``) and POER with a fixed L = round(f x mean answer length)
for each fraction f (the mean over the cache pool's initial answers: the reference solutions, or the
sampled answers), all from the config's task and warm start, each for ``--steps`` steps, evaluating the
held-out set (the config's ``eval.*``) at ``--eval-steps``. Writes to ``--out``:

* ``sweep.json``: per arm and seed, per-step metrics (tokens, times) and the evaluations (step, cumulative
  decoded tokens, cumulative training wall time, held-out accuracy), the final per-problem accuracies, and
  the table below;
* ``sweep_accuracy.png``: held-out accuracy against steps, training wall time and decoded tokens;
* ``sweep_table.md``: per arm, decoded tokens per sample, median rollout / update / step time, held-out
  accuracy at the start, at the last step (equal steps) and at equal decoded tokens (every arm's accuracy,
  linearly interpolated, at the decoded-token total of the cheapest arm's run), and a paired sign-flip test
  over problems of each POER arm against GRPO at the last step (mean over seeds; problems pooled over seeds).

Wall times are this machine's and include its load; the step and token counts do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _mean_answer_length(cfg: Any) -> float:
    """Mean token length of the answers the cache pool starts from (solutions, or one sample each)."""
    from poer_jax.train.loop import PoerTrainer

    trainer = PoerTrainer(cfg)  # builds and initialises the pool exactly as a POER run does
    try:
        lengths = np.asarray(trainer.pool.lengths)
        return float(lengths[lengths > 0].mean())
    finally:
        _close(trainer)


def _close(trainer: Any) -> None:
    trainer.rewards.close()
    if trainer.grader is not trainer.rewards:
        trainer.grader.close()
    if trainer.metrics is not None:
        trainer.metrics.close()
    trainer.checkpointer.close()


def _evaluate(trainer: Any) -> tuple[float, list[float]]:
    """Held-out accuracy and per-problem accuracies (mean over the k samples)."""
    m = trainer.evaluate()
    return float(m["eval/accuracy"]), [float(x) for x in trainer.last_eval_correct.mean(axis=1)]


def run_arm(cfg: Any, name: str, overrides: list[str], steps: int, eval_steps: set[int], workdir: Path,
            start: tuple[float, list[float]] | None) -> dict[str, Any]:
    """One training run; returns its per-step metrics and evaluations."""
    from poer_jax.system.config import apply_overrides, validate
    from poer_jax.train.loop import PoerTrainer

    c = validate(apply_overrides(cfg, [f"workdir={workdir}", f"train.max_steps={steps}", "eval.every=0",
                                       "train.checkpoint_every=1000000", "train.export_final=false", "resume=false",
                                       *overrides]))
    trainer = PoerTrainer(c)
    evals, rows = [], []
    decoded = wall = 0.0
    try:
        acc, per_problem = start if start is not None else _evaluate(trainer)
        start_per_problem = per_problem
        evals.append({"step": 0, "decoded_tokens": 0.0, "wall_s": 0.0, "accuracy": acc})
        t0 = time.perf_counter()
        while trainer.step < steps:
            m = trainer.train_step()
            rows.append({k: v for k, v in m.items() if isinstance(v, int | float)})
            decoded += m["tokens/decoded"]
            wall += m["time/step_s"]
            if trainer.step in eval_steps or trainer.step == steps:
                acc, per_problem = _evaluate(trainer)
                evals.append({"step": trainer.step, "decoded_tokens": decoded, "wall_s": wall, "accuracy": acc})
                print(f"  {name} step {trainer.step}: held-out accuracy {acc:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        _close(trainer)
    timed = rows[1:] or rows
    med = lambda k: float(statistics.median(r[k] for r in timed))  # noqa: E731
    samples = c.data.questions_per_step * c.rollout.group_size * len(rows)
    return {"arm": name, "overrides": overrides, "steps": rows, "evals": evals,
            "start_per_problem": start_per_problem, "final_per_problem": per_problem,
            "decoded_tokens_per_sample": sum(r["tokens/decoded"] for r in rows) / samples,
            "rollout_s": med("time/rollout_s"), "update_s": med("time/update_s"), "step_s": med("time/step_s")}


def _interp(evals: list[dict], key: str, x: float) -> float:
    xs = [e[key] for e in evals]
    ys = [e["accuracy"] for e in evals]
    return float(np.interp(x, xs, ys))


def summarise(runs: dict[str, list[dict]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """One row per arm, means over seeds (see the module docstring)."""
    from poer_jax.eval.paired import paired_sign_flip_test

    budget = min(r["evals"][-1]["decoded_tokens"] for arm in runs.values() for r in arm)
    grpo = np.concatenate([r["final_per_problem"] for r in runs["grpo"]]) if "grpo" in runs else None
    table = []
    for name, arm in runs.items():
        def mean(f: Any, arm: list[dict] = arm) -> float:
            return float(np.mean([f(r) for r in arm]))

        row = {"arm": name, "label": labels[name], "seeds": len(arm),
               "decoded_tokens_per_sample": mean(lambda r: r["decoded_tokens_per_sample"]),
               "rollout_s": mean(lambda r: r["rollout_s"]), "update_s": mean(lambda r: r["update_s"]),
               "step_s": mean(lambda r: r["step_s"]),
               "accuracy_start": mean(lambda r: r["evals"][0]["accuracy"]),
               "accuracy_last": mean(lambda r: r["evals"][-1]["accuracy"]), "last_step": arm[0]["evals"][-1]["step"],
               "equal_decoded_tokens": budget,
               "accuracy_at_equal_decoded": mean(lambda r: _interp(r["evals"], "decoded_tokens", budget)),
               "training_wall_s": mean(lambda r: r["evals"][-1]["wall_s"])}
        mine = np.concatenate([r["final_per_problem"] for r in arm])
        row["vs_start_p"] = paired_sign_flip_test(np.concatenate([r["start_per_problem"] for r in arm]), mine).p_value
        if grpo is not None and name != "grpo":
            t = paired_sign_flip_test(grpo, mine, alternative="two-sided")
            row["vs_grpo_difference"], row["vs_grpo_p"] = t.mean_difference, t.p_value
        table.append(row)
    return table


def table_markdown(table: list[dict]) -> str:
    head = ("| run | decoded tokens / sample | rollout s | update s | step s | held-out acc. start | "
            f"acc. at step {table[0]['last_step']} | acc. at {table[0]['equal_decoded_tokens']:,.0f} decoded tokens "
            "| vs start (p) | vs GRPO at equal steps (p) |")
    lines = [head, "|" + "---|" * 10]
    for r in table:
        vs = f"{r['vs_grpo_difference']:+.3f} ({r['vs_grpo_p']:.2g})" if "vs_grpo_p" in r else ""
        lines.append(f"| {r['label']} | {r['decoded_tokens_per_sample']:.1f} | {r['rollout_s']:.3f} | "
                     f"{r['update_s']:.3f} | {r['step_s']:.3f} | {r['accuracy_start']:.3f} | "
                     f"{r['accuracy_last']:.3f} | "
                     f"{r['accuracy_at_equal_decoded']:.3f} | {r['vs_start_p']:.2g} | {vs} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, arm in runs.items():
        for ax, key, xlabel in zip(axes, ("step", "wall_s", "decoded_tokens"),
                                   ("training step", "training wall time (s)", "decoded tokens (cumulative)"),
                                   strict=True):
            xs = np.mean([[e[key] for e in r["evals"]] for r in arm], axis=0)
            ys = np.mean([[e["accuracy"] for e in r["evals"]] for r in arm], axis=0)
            ax.plot(xs, ys, marker="o", ms=3, label=labels[name])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out accuracy")
    axes[2].set_xscale("symlog", linthresh=1e4)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="0.1,0.25,0.5", help="POER arms: L / mean answer length")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-steps", default="2,5,10,20,40,60,80,100")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--no-grpo", action="store_true")
    args, rest = ap.parse_known_args(argv)

    from poer_jax import system
    from poer_jax.system.config import ConfigError, apply_overrides, config_from_argv

    try:
        cfg = config_from_argv(rest)
        fractions = [float(x) for x in args.fractions.split(",") if x]
        seeds = [int(x) for x in args.seeds.split(",") if x]
        eval_steps = {int(x) for x in args.eval_steps.split(",") if x}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    base = system.prepare_shared_start(cfg, args.out / "work" / "base")
    mean_len = _mean_answer_length(apply_overrides(base, [f"workdir={args.out / 'work' / 'probe'}",
                                                          "rollout.strategy=poer", "eval.enabled=false"]))
    arms: dict[str, list[str]] = {} if args.no_grpo else {"grpo": ["rollout.strategy=full"]}
    labels = {"grpo": "GRPO"}
    for f in fractions:
        L = max(1, round(f * mean_len))
        arms[f"poer_{f:g}"] = ["rollout.strategy=poer", "cache.truncation=fixed", f"cache.max_truncation={L}"]
        labels[f"poer_{f:g}"] = f"POER L = {L} ({L / mean_len:.2f} of the answer)"
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in seeds:
        start = None
        for name, over in arms.items():
            print(f"seed {seed}: {labels[name]}", flush=True)
            r = run_arm(base, name, [f"seed={seed}", *over], args.steps, eval_steps,
                        args.out / "work" / f"{name}_s{seed}", start)
            if start is None:  # every arm of a seed starts from the same model and evaluates it identically
                start = (r["evals"][0]["accuracy"], r["start_per_problem"])
            runs[name].append(r)
    table = summarise(runs, labels)
    result = {"config": [a for a in rest if a.startswith("--config")], "mean_answer_length": mean_len,
              "fractions": fractions, "seeds": seeds, "labels": labels, "runs": runs, "table": table}
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1))
    (args.out / "sweep_table.md").write_text(table_markdown(table) + "\n")
    plot(runs, labels, args.out / "sweep_accuracy.png")
    print(table_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
