"""POER against GRPO across seeds: held-out accuracy at equal steps, equal decoded tokens and equal wall time.

    # the 3-seed evidence (README): POER at L = 20 (the paper's continuation budget, and capped at 32 tokens) and
    # GRPO on the demo task, 100 steps, 512 held-out problems, one process per core (--run-arms), then the
    # comparison with time priced from a quiet bench_rollout.py JSON
    S="--config=configs/toy.py --L 20 --seeds 0,1,2 --steps 100 --config.toy.num_test=512 --eval-steps 50,100"
    S="$S --grpo-eval-steps 4,8,75 --out runs/sweep3"
    CAP="cap32:rollout.strategy=poer;cache.truncation=fixed;cache.max_truncation=20;rollout.max_continuation_len=32"
    taskset -c 0 env PYTHONPATH=. python scripts/sweep_poer.py $S --arm "$CAP" --run-arms poer_L20,cap32 &
    taskset -c 1 env PYTHONPATH=. python scripts/sweep_poer.py $S --arm "$CAP" --run-arms grpo --seeds 2,1,0; wait
    PYTHONPATH=. python scripts/sweep_poer.py $S --arm "$CAP" --aggregate-only \
        --quiet-bench docs/results/bench_rollout_toy_demo.json

    [--fractions 0.1,0.25,0.5] (L as a fraction of the mean cached answer, instead of --L)
    [--arm NAME:KEY=VALUE[;KEY=VALUE]] (more arms, e.g. poer_removed:rollout.strategy=poer;cache.budget=removed)
    [--eval-steps 10,20,...] [--grpo-eval-steps 1,2,...] [--checkpoint-every 10] [--no-grpo] [--aggregate-only]
    [--run-arms NAME,...] (run only these arms; several processes can share one --out)

Every (arm, seed) is one training run from the config's task and starting model (prepared once in
``OUT/work/base``), with the seed's data order and sampling; the held-out set (the config's ``eval.*``, e.g.
avg@4 with ``eval.num_samples=4``) is evaluated at the start, at ``--eval-steps`` (every arm) and for GRPO also
at ``--grpo-eval-steps``: GRPO spends a POER run's whole decoded-token budget within its first ~10 steps, so its
early evaluations are the ones the equal-token comparison reads. The start is evaluated once per seed (every
arm of a seed starts from the same model and evaluates with the same sampling key).

Resumable: a killed sweep continues where it stopped. A finished run's ``OUT/runs/<arm>_s<seed>.json`` is kept
and not rerun; an unfinished run reuses its workdir ``OUT/work/<arm>_s<seed>``: the trainer resumes from its
last checkpoint (every ``--checkpoint-every`` steps), its per-step metrics (``metrics.jsonl``) and evaluations
(``evals.jsonl``, per-problem accuracies) are cut back to that step and continue.

Written to ``OUT``: per run ``runs/<arm>_s<seed>.json`` (per-step counts and times, the evaluations with their
per-problem accuracies); ``sweep.json`` (runs, the statistics below, how time was measured); ``sweep_table.md``;
``sweep_accuracy.png`` (accuracy against steps, decoded tokens and wall time, mean over seeds with their range).

The statistics, for every other arm against GRPO (``compare_arms``, in ``scripts/sweep_stats.py``):

* equal steps: the last step; equal decoded tokens: GRPO's first evaluation that has decoded at least the arm's
  whole run (per seed); equal wall time: the same with the training time (rollout + rewards + update, no
  evaluation) on each clock. At each point, accuracy mean and standard deviation over seeds (the seed-level
  spread), the per-seed differences, and a paired sign-flip test over problems (two-sided) of the per-problem
  accuracy averaged over seeds and samples (the problems are the same in every run).
* vs start: each arm's last evaluation against the start (one-sided: did it improve).

Two clocks: ``measured`` sums the runs' own step times, which a busy machine inflates unevenly (a sweep runs
for hours beside other work); ``priced`` (with ``--quiet-bench``, a ``scripts/bench_rollout.py`` JSON measured
on a quiet core) prices every step of a run from its own counts at the quiet medians of its strategy: prefill
seconds per prefilled token, decode seconds per decode step, the rollout's host time, update seconds per trained
token, and the rest of a step. Step and token counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sweep_stats import REFERENCE, compare_arms, eval_points, quiet_rates  # scripts/: beside this file

STEP_KEYS = ("tokens/decoded", "tokens/prefilled", "tokens/trained", "rollout/decode_steps",
             "rollout/continuation_p95", "rollout/continuation_max", "rollout/row_utilisation", "time/rollout_s",
             "time/prefill_s", "time/decode_s", "time/rollout_host_s", "time/update_s", "time/reward_s",
             "time/step_s", "rewards/accuracy/mean", "completions/mean_length")
DEFAULT_EVAL_STEPS = "10,20,30,40,50,60,70,80,90,100"
DEFAULT_GRPO_EVAL_STEPS = "1,2,3,4,5,6,7,8,9"


# ---- one run ------------------------------------------------------------------------------------------------
def _close(trainer: Any) -> None:
    trainer.close()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _evaluate(trainer: Any) -> tuple[float, list[float]]:
    """Held-out accuracy and per-problem accuracies (mean over the k samples)."""
    m = trainer.evaluate()
    return float(m["eval/accuracy"]), [float(x) for x in trainer.last_eval_correct.mean(axis=1)]


def run_arm(cfg: Any, name: str, seed: int, overrides: list[str], steps: int, eval_steps: set[int], out: Path,
            checkpoint_every: int) -> dict[str, Any]:
    """One (arm, seed) run, resumed from its workdir when it was cut short; writes and returns its run JSON."""
    from poer_jax.system.config import apply_overrides, validate
    from poer_jax.train.loop import PoerTrainer
    from poer_jax.train.metrics import read_metrics

    workdir = out / "work" / f"{name}_s{seed}"
    c = validate(apply_overrides(cfg, [f"workdir={workdir}", f"seed={seed}", f"train.max_steps={steps}",
                                       "eval.every=0", f"train.checkpoint_every={checkpoint_every}",
                                       "train.export_final=false", "resume=true", *overrides]))
    trainer = PoerTrainer(c)
    evals_path = workdir / "evals.jsonl"
    try:
        first = trainer.step  # 0, or the checkpoint it resumed from
        evals = [e for e in _read_jsonl(evals_path) if e["step"] <= first]  # later ones are redone
        start_file = out / "runs" / f"start_s{seed}.json"
        if not any(e["step"] == 0 for e in evals):
            if start_file.is_file():  # every arm of a seed starts from the same model, evaluated with one key
                evals.insert(0, json.loads(start_file.read_text()))
            else:
                acc, per_problem = _evaluate(trainer)
                evals.insert(0, {"step": 0, "accuracy": acc, "per_problem": per_problem})
                tmp = start_file.with_suffix(f".{os.getpid()}.tmp")  # another process may read it: whole or absent
                tmp.write_text(json.dumps(evals[0]))
                tmp.replace(start_file)
        _write_jsonl(evals_path, evals)
        if first:
            print(f"  {name} seed {seed}: resumed at step {first}", flush=True)
        t0 = time.perf_counter()
        while trainer.step < steps:
            m = trainer.train_step()
            assert trainer.metrics is not None
            trainer.metrics.write(trainer.step, m)
            if trainer.step in eval_steps or trainer.step == steps:
                acc, per_problem = _evaluate(trainer)
                evals.append({"step": trainer.step, "accuracy": acc, "per_problem": per_problem})
                _write_jsonl(evals_path, evals)
                print(f"  {name} seed {seed} step {trainer.step}: held-out accuracy {acc:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if trainer.step % checkpoint_every == 0 or trainer.step == steps:
                trainer._save(force=trainer.step == steps)
    finally:
        _close(trainer)
    rows = [{k: r[k] for k in STEP_KEYS if k in r} | {"step": r["step"]}
            for r in read_metrics(workdir / "metrics.jsonl") if r["step"] > 0]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"sweep: {workdir}/metrics.jsonl holds steps {[r['step'] for r in rows]}, "
                           f"expected 1..{steps}")
    strategy = c.rollout.strategy
    run = {"arm": name, "seed": seed, "strategy": strategy, "overrides": overrides, "steps_done": steps,
           "steps": rows, "evals": evals, "config": {"L": c.cache.max_truncation if strategy == "poer" else None,
                                                      "budget": c.cache.budget,
                                                      "max_continuation_len": c.rollout.max_continuation_len}}
    path = out / "runs" / f"{name}_s{seed}.json"
    path.write_text(json.dumps(run))
    return run


def _fmt_vs(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    steps = sorted(set(c["reference_steps"]))
    at = f" (GRPO step {'/'.join(str(s) for s in steps)})" if "budget" in c else ""
    return f"{c['accuracy']:.3f} vs {c['reference_accuracy']:.3f}{at}: {c['difference']:+.3f}, p = {c['p']:.2g}"


def table_markdown(stats: dict[str, Any], labels: dict[str, str]) -> str:
    """One row per arm: cost (medians) and accuracy; the comparisons against GRPO (``compare_arms``)."""
    arms = stats["arms"]
    clocks = stats["clocks"]
    head = ["run", "seeds", "decoded tokens / step", "decode steps / rollout", "rollout s", "update s", "step s",
            "acc. start", "acc. last (sd over seeds)", "vs start p", "vs GRPO, equal steps",
            "vs GRPO, equal decoded tokens"] + [f"vs GRPO, equal time ({c[:-2]})" for c in clocks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, a in arms.items():
        v = a.get("vs_reference", {})
        cells = [labels.get(arm, arm), str(len(a["seeds"])), f"{a['decoded_tokens_per_step']:,.0f}",
                 f"{a['decode_steps_per_rollout']:.0f}", f"{a['rollout_s']:.3f}", f"{a['update_s']:.3f}",
                 f"{a['step_s']:.3f}", f"{a['accuracy_start']:.3f}",
                 f"{a['accuracy_last']:.3f} ({a['accuracy_last_std']:.3f}) at step {a['last_step']}",
                 f"{a['vs_start_p']:.2g}", _fmt_vs(v.get("equal_steps")), _fmt_vs(v.get("equal_decoded_tokens"))]
        cells += [_fmt_vs(v.get(f"equal_time_{c[:-2]}")) for c in clocks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], labels: dict[str, str], rates: dict[str, dict[str, float]] | None,
         path: Path) -> None:
    """Held-out accuracy against steps, decoded tokens and training time (each clock): mean over seeds, range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = [("step", "training step"), ("decoded_tokens", "decoded tokens (cumulative)"),
                 ("measured_s", "training time, measured (s)")]
    if rates is not None:
        axes_keys.append(("priced_s", "training time, priced at quiet-core rates (s)"))
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5 * len(axes_keys), 4.2))
    for arm, rs in runs.items():
        pts = [eval_points(r, rates) for r in rs]
        steps = sorted(set.intersection(*({p["step"] for p in ps} for ps in pts)))
        for ax, (key, xlabel) in zip(axes, axes_keys, strict=True):
            xs = np.mean([[p[key] for p in ps if p["step"] in steps] for ps in pts], axis=0)
            ys = np.asarray([[p["accuracy"] for p in ps if p["step"] in steps] for ps in pts])
            line, = ax.plot(xs, ys.mean(axis=0), marker="o", ms=3, label=f"{labels.get(arm, arm)} ({len(rs)} seeds)")
            if len(rs) > 1:
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out accuracy")
    axes[1].set_xscale("symlog", linthresh=1e4)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def aggregate(out: Path, arms: dict[str, list[str]], labels: dict[str, str], seeds: list[int],
              bench: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any] | None:
    """Read the finished runs, compare, write sweep.json / sweep_table.md / sweep_accuracy.png."""
    runs: dict[str, list[dict]] = {}
    missing = []
    for arm in arms:
        for seed in seeds:
            path = out / "runs" / f"{arm}_s{seed}.json"
            if path.is_file():
                runs.setdefault(arm, []).append(json.loads(path.read_text()))
            else:
                missing.append(f"{arm}_s{seed}")
    if not runs:
        print("no finished run to aggregate", flush=True)
        return None
    rates = quiet_rates(bench) if bench is not None else None
    stats = compare_arms(runs, rates)
    clock_note = ("measured: the sum of each run's own step times (rollout + rewards + update, no evaluation) on "
                  "this machine as it was" + ("; priced: every step priced from its own counts at the quiet medians "
                                              "of its strategy (prefill s per prefilled token, decode s per decode "
                                              "step, host s, update s per trained token, rest of the step) from "
                                              f"{meta.get('quiet_bench')}" if rates is not None else ""))
    result = {**meta, "labels": labels, "missing": missing, "clocks": clock_note, "quiet_rates": rates,
              "statistics": stats, "runs": {arm: [{**r, "points": eval_points(r, rates)} for r in rs]
                                            for arm, rs in runs.items()}}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    table = table_markdown(stats, labels)
    (out / "sweep_table.md").write_text(table + "\n\nTime: " + clock_note + "\n")
    plot(runs, labels, rates, out / "sweep_accuracy.png")
    print(table)
    if missing:
        print(f"not finished yet: {', '.join(missing)}")
    return result


# ---- command line ---------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", default="", help="POER arms with these fixed L (tokens), e.g. 20")
    ap.add_argument("--fractions", default="", help="POER arms with L = f x the mean cached answer (default, without "
                    "--L or --arm: 0.1,0.25,0.5)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                    help="another arm with these config overrides (repeatable)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-steps", default=DEFAULT_EVAL_STEPS, help="evaluations of every arm (and the last step)")
    ap.add_argument("--grpo-eval-steps", default=DEFAULT_GRPO_EVAL_STEPS,
                    help="GRPO's extra early evaluations (for the equal-token comparison)")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="a killed run resumes from its last checkpoint")
    ap.add_argument("--quiet-bench", type=Path, default=None,
                    help="a scripts/bench_rollout.py JSON from a quiet core: price the runs' steps with it")
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--no-grpo", action="store_true")
    ap.add_argument("--aggregate-only", action="store_true", help="only compare the finished runs")
    ap.add_argument("--run-arms", default="", help="run only these arms (comma-separated names, e.g. grpo or "
                    "poer_L20), in the order of --seeds; the others are compared when finished: splits one sweep "
                    "over processes sharing --out (one per core)")
    args, rest = ap.parse_known_args(argv)
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()  # the test extra's libtpu / CUDA plugin without their hardware: not started


    from poer_jax import system
    from poer_jax.system.config import ConfigError, apply_overrides, config_from_argv, validate

    try:
        cfg = config_from_argv(rest)
        seeds, eval_steps, grpo_eval = _ints(args.seeds), set(_ints(args.eval_steps)), set(_ints(args.grpo_eval_steps))
        fixed_L, fractions = _ints(args.L), [float(x) for x in args.fractions.split(",") if x.strip()]
        if not (fixed_L or fractions or args.arm):
            fractions = [0.1, 0.25, 0.5]  # the frontier over L
        extra = []
        for spec in args.arm:
            name, _, over = spec.partition(":")
            pairs = [o for o in over.split(";") if o]
            if not name or not pairs or any("=" not in o for o in pairs) or name == REFERENCE:
                raise ValueError(f"--arm {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE] (NAME not {REFERENCE!r})")
            validate(apply_overrides(cfg, pairs))
            extra.append((name, pairs))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.checkpoint_every < 1 or not seeds:
        ap.error("--steps and --checkpoint-every must be >= 1, --seeds must name a seed")
    bench = json.loads(args.quiet_bench.read_text()) if args.quiet_bench else None
    if bench is not None and not all("per_step" in bench.get(k, {}) for k in ("poer", "grpo")):
        print(f"error: --quiet-bench {args.quiet_bench}: no per-step rows (a bench_rollout.py JSON of this version)",
              file=sys.stderr)
        return 2
    out = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(exist_ok=True)
    with open(out / "work" / "base.lock", "w") as lock:  # processes sharing --out: one prepares, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = system.prepare_shared_start(cfg, out / "work" / "base")
    arms: dict[str, list[str]] = {} if args.no_grpo else {REFERENCE: ["rollout.strategy=full"]}
    labels = {REFERENCE: "GRPO"}
    for L in fixed_L:
        arms[f"poer_L{L}"] = ["rollout.strategy=poer", "cache.truncation=fixed", f"cache.max_truncation={L}"]
        labels[f"poer_L{L}"] = f"POER L = {L}"
    mean_len = None
    if fractions:
        mean_len = _mean_answer_length(apply_overrides(base, [f"workdir={out / 'work' / 'probe'}",
                                                              "rollout.strategy=poer", "eval.enabled=false"]))
        for f in fractions:
            L = max(1, round(f * mean_len))
            arms[f"poer_{f:g}"] = ["rollout.strategy=poer", "cache.truncation=fixed", f"cache.max_truncation={L}"]
            labels[f"poer_{f:g}"] = f"POER L = {L} ({L / mean_len:.2f} of the answer)"
    for name, pairs in extra:
        arms[name] = pairs
        labels[name] = f"{name} ({'; '.join(pairs)})"
    meta = {"config": [a for a in rest if a.startswith("--config")], "seeds": seeds, "steps": args.steps,
            "eval_steps": sorted(eval_steps), "grpo_eval_steps": sorted(grpo_eval), "arms": arms,
            "mean_answer_length": mean_len, "quiet_bench": str(args.quiet_bench) if args.quiet_bench else None}
    run_only = [a for a in args.run_arms.split(",") if a]
    unknown = sorted(set(run_only) - set(arms))
    if unknown:
        print(f"error: --run-arms {','.join(unknown)}: not an arm of this sweep ({', '.join(arms)})", file=sys.stderr)
        return 2
    if not args.aggregate_only:
        for seed in seeds:
            for name, over in arms.items():
                if run_only and name not in run_only:
                    continue
                done = out / "runs" / f"{name}_s{seed}.json"
                if done.is_file() and json.loads(done.read_text()).get("steps_done") == args.steps:
                    continue
                print(f"seed {seed}: {labels[name]}", flush=True)
                evals = eval_steps | (grpo_eval if name == REFERENCE else set())
                run_arm(base, name, seed, over, args.steps, {s for s in evals if s <= args.steps}, out,
                        args.checkpoint_every)
    aggregate(out, arms, labels, seeds, bench, meta)
    return 0


def _mean_answer_length(cfg: Any) -> float:
    """Mean token length of the answers the cache pool starts from (solutions, or one sample each)."""
    from poer_jax.train.loop import PoerTrainer

    trainer = PoerTrainer(cfg)  # builds and initialises the pool exactly as a POER run does
    try:
        lengths = np.asarray(trainer.pool.lengths)
        return float(lengths[lengths > 0].mean())
    finally:
        _close(trainer)


if __name__ == "__main__":
    sys.exit(main())
