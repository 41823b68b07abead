"""POER vs full-rollout GRPO on the same model, data and seed, in one process (paper Table 2 / Figure 3),
and the step-time ratio that the measured token counts project for R1-Distill-Qwen-1.5B / 7B on accelerators.

    PYTHONPATH=. python scripts/bench_rollout.py --config=configs/toy.py [--steps 10] [--json PATH]
        [--sweep-L 4,8,16] [--sweep-G 4,6,8] [--poer-variant NAME:KEY=VALUE[;KEY=VALUE]] [--config.KEY=VALUE ...]
    # the paper's budget against the authors' and a cap on the continuation (docs/rollout.md):
    PYTHONPATH=. python scripts/bench_rollout.py --config=configs/toy.py --poer-variant removed:cache.budget=removed \
        --poer-variant cap32:rollout.max_continuation_len=32
    # real shapes (random weights) or a local HF model, e.g. on a GPU:
    PYTHONPATH=. python scripts/bench_rollout.py --config=configs/toy.py --preset r1-distill-qwen-1.5b \\
        --dtype bfloat16 --config.rollout.max_completion_len=4096 --config.cache.init=sample ...
    PYTHONPATH=. python scripts/bench_rollout.py --config=configs/toy.py --model-path /models/R1-Distill-1.5B ...

Runs a few training steps with rollout.strategy=poer and with rollout.strategy=full from the same starting
model (the config's task, tokenizer and warm start are prepared once and shared), one step of each in turn in
one process (so a busy machine's load falls on both alike and their time ratios hold), then prints a table and
writes JSON: decoded and prefilled tokens per sample (counted by the sampler), trained tokens per sample,
rollout / update / step wall time (the median over the steps after the first, so that compiles of new
shape buckets do not count), and the POER/GRPO ratios ``decoded_tokens_ratio``, ``rollout_time_ratio``,
``step_time_ratio``. ``--sweep-L`` repeats POER for several fixed L (Table 2), ``--sweep-G`` both strategies
for several group sizes (Figure 3), ``--poer-variant`` POER with other settings (each against the same GRPO
run). The POER cache pool is initialised before timing starts (``setup_s``).

The rollout's critical path, per strategy (``train/step_metrics.py``): decode steps per rollout (a batched
decode runs until its longest continuation stops, so on an accelerator its time follows the steps, not the
tokens), continuation p50 / p95 / max, row utilisation (decode-step tokens / rows the steps computed), and the
rollout time split into prefill, decode and host work (medians), the decode step in ms; ``decode_steps_ratio``
next to the token and time ratios. ``per_step`` keeps every step's counts and times (scripts/sweep_poer.py
prices its runs with them: ``--quiet-bench``).

``projection``: the POER / GRPO step-time ratio that the measured per-step token counts (prefilled,
decoded, trained; scaled to the paper's batch of 576 samples) give for R1-Distill-Qwen-1.5B and -7B on an
8-chip H100 / TPU v5p host from roofline per-token costs (``poer_jax.plan.projection``), next to the
paper's 7.4 %, for a data-parallel rollout on all 8 chips and for the paper's layout (one chip samples,
eight train); ``projection_paper_tokens`` does the same with the paper's own Table 2 token counts. With the
run's measured decode steps per rollout, decode is also priced by steps (``step_ratio_by_steps``;
``poer_decode_bound`` / ``grpo_decode_bound`` say whether a decode step is memory- or compute-bound): a step
reads the weights once however few of its rows still produce tokens, so a long tail costs more than its tokens.

``--preset`` builds random weights of a real shape (``--dtype bfloat16`` for bf16 weights and compute) and
``--model-path`` loads a local HF model; both keep the config's generated task as data and skip the warm
start. Random weights rarely emit EOS: give POER the authors' budget (``cache.budget=removed``) or a
sampled cache (``cache.init=sample``) so that continuations stay short, as they are for a trained model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAPER = {"table2_decoded_per_sample": {"poer": 145.9, "grpo": 2689.5, "ratio": 145.9 / 2689.5},
         "figure3_training_time_ratio_1p5b_G6_L300": 0.074, "batch_samples": 576, "group_size": 6}
PROJECT_MODELS = ("r1-distill-qwen-1.5b", "r1-distill-qwen-7b")
PROJECT_CHIPS = ("h100-80gb", "tpu-v5p", "h20")  # h20: the paper's GPU
# per training step, kept in the JSON: what the sweep prices runs with and what docs/rollout.md reads
STEP_KEYS = ("tokens/decoded", "tokens/prefilled", "tokens/trained", "rollout/decode_steps", "rollout/continuation_p50",
             "rollout/continuation_p95", "rollout/continuation_max", "rollout/row_utilisation", "time/rollout_s",
             "time/prefill_s", "time/decode_s", "time/rollout_host_s", "time/update_s", "time/reward_s", "time/step_s",
             "rewards/accuracy/mean")


def _prepare(cfg: Any, base: Path, preset: str | None = None, model_path: str | None = None,
             dtype: str | None = None) -> Any:
    """The task and the starting model, prepared once for every run; with ``preset`` / ``model_path`` the
    task's data with that model instead (no warm start)."""
    from poer_jax import system
    from poer_jax.system.config import apply_overrides, validate

    if preset or model_path:
        cfg = apply_overrides(cfg, [f"workdir={base}"])
        if cfg.toy.enabled:
            cfg = system.prepare_toy(cfg)  # the data; the tiny model it also makes is not used
        tok = None if model_path else cfg.model.tokenizer_path or cfg.model.path
        cfg.model.path, cfg.model.preset, cfg.model.tokenizer_path = model_path, preset, tok
        cfg = apply_overrides(cfg, ["toy.enabled=false", "warm_start.steps=0", "warm_start.path=None"])
    else:
        cfg = system.prepare_shared_start(cfg, base)
    over = ["eval.enabled=false", "train.export_final=false", "resume=false", "train.checkpoint_every=1000000"]
    if dtype:
        over += [f"model.dtype={dtype}", f"model.param_dtype={dtype}"]
    return validate(apply_overrides(cfg, over))


def _start(cfg: Any, strategy: str, steps: int, workdir: Path, extra: list[str] | None) -> tuple[Any, Any, float]:
    """A trainer for ``steps`` steps of ``strategy`` (its POER cache pool initialised: ``setup_s``)."""
    from poer_jax.system.config import apply_overrides, validate
    from poer_jax.train.loop import PoerTrainer

    shutil.rmtree(workdir, ignore_errors=True)
    c = validate(apply_overrides(cfg, [f"rollout.strategy={strategy}", f"workdir={workdir}",
                                       f"train.max_steps={steps}", *(extra or [])]))
    t0 = time.perf_counter()
    trainer = PoerTrainer(c)  # the cache pool is initialised here (POER)
    return trainer, c, time.perf_counter() - t0


def _close(trainer: Any) -> None:
    trainer.rewards.close()
    if trainer.grader is not trainer.rewards:
        trainer.grader.close()
    if trainer.metrics is not None:
        trainer.metrics.close()
    trainer.checkpointer.close()


def run_strategy(cfg: Any, strategy: str, steps: int, workdir: Path, extra: list[str] | None = None) -> dict:
    """``steps`` training steps with the given strategy; returns per-sample token counts and timings."""
    return run_interleaved(cfg, [(strategy, workdir, extra)], steps)[0]


def run_interleaved(cfg: Any, arms: list[tuple[str, Path, list[str] | None]], steps: int) -> list[dict]:
    """Several runs (strategy, workdir, overrides) side by side in one process, one step of each in turn: the
    machine's load at any moment falls on all of them alike, so their time ratios hold on a busy machine."""
    started: list[tuple[Any, Any, float]] = []
    rows: list[list[dict]] = [[] for _ in arms]
    try:
        for strategy, workdir, extra in arms:
            started.append(_start(cfg, strategy, steps, workdir, extra))
        for _ in range(steps):
            for i, (trainer, _, _) in enumerate(started):
                rows[i].append(trainer.train_step())
    finally:
        for trainer, _, _ in started:
            _close(trainer)
    return [_summary(c, strategy, r, setup_s)
            for (strategy, _, _), (_, c, setup_s), r in zip(arms, started, rows, strict=True)]


def _summary(c: Any, strategy: str, rows: list[dict], setup_s: float) -> dict:
    samples = c.data.questions_per_step * c.rollout.group_size * len(rows)
    timed = rows[1:] if len(rows) > 1 else rows  # step 1 compiles
    # medians: a step that meets a new shape bucket compiles, and one compile would dominate a mean
    median = lambda key: float(statistics.median(r[key] for r in timed))  # noqa: E731
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {
        "strategy": strategy, "steps": len(rows), "samples": samples,
        "group_size": c.rollout.group_size, "truncation": c.cache.truncation, "max_truncation": c.cache.max_truncation,
        "truncation_fraction": c.cache.truncation_fraction, "budget": c.cache.budget,
        "decoded_tokens_per_sample": sum(r["tokens/decoded"] for r in rows) / samples,
        "prefilled_tokens_per_sample": sum(r["tokens/prefilled"] for r in rows) / samples,
        "trained_tokens_per_sample": sum(r["tokens/trained"] for r in rows) / samples,
        "response_length": mean("completions/mean_length"),
        "continuation_length": mean("completions/mean_continuation_length"),
        "mean_L": mean("truncation/mean_L"),
        "rollout_s": median("time/rollout_s"), "update_s": median("time/update_s"), "reward_s": median("time/reward_s"),
        "step_s": median("time/step_s"), "setup_s": setup_s,
        "accuracy": sum(r.get("rewards/accuracy/mean", float("nan")) for r in rows) / len(rows),
        # the critical path: a batched decode runs until its longest continuation stops
        "decode_steps": mean("rollout/decode_steps"), "continuation_p50": mean("rollout/continuation_p50"),
        "continuation_p95": mean("rollout/continuation_p95"), "continuation_max": mean("rollout/continuation_max"),
        "continuation_max_all": max(r["rollout/continuation_max"] for r in rows),
        "row_utilisation": mean("rollout/row_utilisation"),
        "prefill_s": median("time/prefill_s"), "decode_s": median("time/decode_s"),
        "rollout_host_s": median("time/rollout_host_s"),
        "decode_step_ms": 1e3 * statistics.median(r["time/decode_s"] / max(r["rollout/decode_steps"], 1)
                                                  for r in timed),
        "max_continuation_len": c.rollout.max_continuation_len,
        "per_step": [{k: r[k] for k in STEP_KEYS if k in r} for r in rows],
    }


def compare(poer: dict, grpo: dict) -> dict:
    return {"decoded_tokens_ratio": poer["decoded_tokens_per_sample"] / grpo["decoded_tokens_per_sample"],
            "decode_steps_ratio": poer["decode_steps"] / grpo["decode_steps"],
            "rollout_time_ratio": poer["rollout_s"] / grpo["rollout_s"],
            "step_time_ratio": poer["step_s"] / grpo["step_s"]}


def step_tokens(r: dict, samples: float) -> Any:
    """A measured strategy's per-sample counts as one step of ``samples`` samples (``plan.projection``)."""
    from poer_jax.plan.projection import StepTokens

    seq = r["trained_tokens_per_sample"]
    prompt = seq - r["response_length"]
    kept = r["response_length"] - r["continuation_length"]  # the reused prefix (0 for GRPO)
    return StepTokens(samples=samples, prefilled=r["prefilled_tokens_per_sample"] * samples,
                      decoded=r["decoded_tokens_per_sample"] * samples, trained=seq * samples,
                      prefill_context=(prompt + kept) / 2, decode_context=prompt + kept + r["continuation_length"] / 2,
                      train_context=seq / 2, decode_steps=r.get("decode_steps"))


def paper_step_tokens(prompt_len: float = 250.0) -> tuple[Any, Any]:
    """(POER, GRPO) steps with the paper's Table 2 counts (1.5B: 145.9 vs 2689.5 decoded tokens a sample), its
    batch (576 samples, G 6) and an open-rs-sized prompt; POER's responses as long as GRPO's."""
    from poer_jax.plan.projection import StepTokens

    n, g, resp, dec = PAPER["batch_samples"], PAPER["group_size"], 2689.5, 145.9
    grpo = StepTokens(samples=n, prefilled=n / g * prompt_len, decoded=n * resp, trained=n * (prompt_len + resp),
                      prefill_context=prompt_len / 2, decode_context=prompt_len + resp / 2,
                      train_context=(prompt_len + resp) / 2)
    kept = resp - dec
    poer = StepTokens(samples=n, prefilled=n / g * (prompt_len + kept), decoded=n * dec,
                      trained=n * (prompt_len + resp), prefill_context=(prompt_len + kept) / 2,
                      decode_context=prompt_len + kept + dec / 2, train_context=(prompt_len + resp) / 2)
    return poer, grpo


def projection(poer: Any, grpo: Any) -> list[dict]:
    from poer_jax.model import preset
    from poer_jax.plan.projection import Layout, ModelCost, project_ratio

    models = {name: ModelCost.from_config(preset(name), name) for name in PROJECT_MODELS}
    layouts = {"rollout on 8 chips": Layout(rollout_chips=8, train_chips=8),
               "paper: 1 chip samples, 8 train": Layout(rollout_chips=1, train_chips=8)}
    rows = project_ratio(poer, grpo, models, {c: c for c in PROJECT_CHIPS}, layouts)
    return [{k: v for k, v in r.items() if k not in ("poer", "grpo")} | {
        "poer_rollout_s": r["poer"]["rollout"], "grpo_rollout_s": r["grpo"]["rollout"],
        "update_s": r["grpo"]["update"]} for r in rows]


def _table(rows: list[dict]) -> str:
    cols = [("strategy", "strategy", "{}"), ("group_size", "G", "{}"), ("budget", "budget", "{}"),
            ("max_continuation_len", "cap", "{}"), ("mean_L", "L", "{:.1f}"),
            ("decoded_tokens_per_sample", "decoded/sample", "{:.1f}"),
            ("prefilled_tokens_per_sample", "prefilled/sample", "{:.1f}"),
            ("trained_tokens_per_sample", "trained/sample", "{:.1f}"), ("response_length", "response", "{:.1f}"),
            ("decode_steps", "decode steps", "{:.1f}"), ("continuation_p95", "cont. p95", "{:.1f}"),
            ("continuation_max", "cont. max", "{:.1f}"), ("row_utilisation", "row util.", "{:.3f}"),
            ("prefill_s", "prefill s", "{:.3f}"), ("decode_s", "decode s", "{:.3f}"),
            ("rollout_host_s", "host s", "{:.3f}"),
            ("rollout_s", "rollout s", "{:.3f}"), ("update_s", "update s", "{:.3f}"), ("step_s", "step s", "{:.3f}")]
    head = " | ".join(label for _, label, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(fmt.format(r[name]).rjust(len(label)) for name, label, fmt in cols))
    return "\n".join(lines)


def _projection_table(rows: list[dict]) -> str:
    steps = all("step_ratio_by_steps" in r for r in rows)
    extra = f" {'ratio by steps':>14} {'decode bound P/G':>16}" if steps else ""
    lines = [f"{'model':<22} {'chip':<10} {'layout':<32} {'GRPO step s':>11} {'POER step s':>11} {'ratio':>6} "
             f"{'GRPO rollout share':>18}{extra}"]
    for r in rows:
        by = (f" {r['step_ratio_by_steps']:>14.3f} {r['poer_decode_bound'] + '/' + r['grpo_decode_bound']:>16}"
              if steps else "")
        lines.append(f"{r['model']:<22} {r['chip']:<10} {r['layout']:<32} {r['grpo_step_s']:>11.2f} "
                     f"{r['poer_step_s']:>11.2f} {r['step_ratio']:>6.3f} {r['grpo_rollout_share']:>18.2f}{by}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="training steps per strategy (the first is not timed)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sweep-L", default="", help="comma-separated fixed truncation lengths L for POER")
    ap.add_argument("--sweep-G", default="", help="comma-separated group sizes (both strategies)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--poer-variant", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                    help="POER with these config overrides, e.g. removed:cache.budget=removed (repeatable)")
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--preset", default=None, help="random weights of a real shape, e.g. r1-distill-qwen-1.5b")
    model.add_argument("--model-path", default=None, help="a local HF model directory (its own tokenizer)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="weights and compute dtype")
    args, rest = ap.parse_known_args(argv)
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()  # the test extra's libtpu / CUDA plugin without their hardware: not started

    from poer_jax.system.config import ConfigError, apply_overrides, load_config_file, validate

    config_path = [a for a in rest if a.startswith("--config=")]
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config")]
    if not config_path or unknown:
        ap.error(f"need --config=FILE; unknown arguments: {unknown}")
    try:
        cfg = validate(apply_overrides(load_config_file(config_path[0].split("=", 1)[1]), overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    variants = []
    for spec in args.poer_variant:
        name, _, over = spec.partition(":")
        pairs = [o for o in over.split(";") if o]
        if not name or not pairs or any("=" not in o for o in pairs):
            ap.error(f"--poer-variant {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE]")
        try:
            validate(apply_overrides(cfg, pairs))
        except ConfigError as e:
            print(f"error: --poer-variant {name}: {e}", file=sys.stderr)
            return 2
        variants.append((name, pairs))

    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    try:
        cfg = _prepare(cfg, base / "base", preset=args.preset, model_path=args.model_path, dtype=args.dtype)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    result: dict[str, Any] = {"config": config_path[0].split("=", 1)[1], "overrides": overrides,
                              "preset": args.preset, "model_path": args.model_path, "dtype": cfg.model.dtype,
                              "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
                              "paper": PAPER}
    # POER, GRPO and the POER variants step by step in turn (run_interleaved): their ratios hold on a busy machine
    arms = [("poer", base / "poer", None), ("full", base / "grpo", None),
            *(("poer", base / f"poer_{name}", pairs) for name, pairs in variants)]
    poer, grpo, *others = run_interleaved(cfg, arms, args.steps)
    result.update(poer=poer, grpo=grpo, **compare(poer, grpo), interleaved=True)
    rows = [poer, grpo]
    if variants:
        result["variants"] = []
        for (name, pairs), r in zip(variants, others, strict=True):
            result["variants"].append({"name": name, "overrides": pairs, **r, **compare(r, grpo)})
            rows.append({**r, "strategy": f"poer {name}"})
    if args.sweep_L:
        result["sweep_L"] = []
        for L in (int(x) for x in args.sweep_L.split(",")):
            r = run_strategy(cfg, "poer", args.steps, base / f"poer_L{L}",
                             ["cache.truncation=fixed", f"cache.max_truncation={L}"])
            result["sweep_L"].append({**r, **compare(r, grpo)})
            rows.append(r)
    if args.sweep_G:
        result["sweep_G"] = []
        for G in (int(x) for x in args.sweep_G.split(",")):
            p = run_strategy(cfg, "poer", args.steps, base / f"poer_G{G}", [f"rollout.group_size={G}"])
            g = run_strategy(cfg, "full", args.steps, base / f"grpo_G{G}", [f"rollout.group_size={G}"])
            result["sweep_G"].append({"group_size": G, "poer": p, "grpo": g, **compare(p, g)})
            rows += [p, g]
    n = PAPER["batch_samples"]
    result["projection"] = projection(step_tokens(poer, n), step_tokens(grpo, n))
    result["projection_paper_tokens"] = projection(*paper_step_tokens())

    print(_table(rows))
    print(f"\nPOER / GRPO: decoded tokens {result['decoded_tokens_ratio']:.3f}, decode steps "
          f"{result['decode_steps_ratio']:.3f}, rollout time {result['rollout_time_ratio']:.3f}, step time "
          f"{result['step_time_ratio']:.3f} "
          f"(paper Table 2 decoded-token ratio {PAPER['table2_decoded_per_sample']['ratio']:.3f})")
    print(f"\nProjected POER / GRPO step time from this run's token counts (per sample, scaled to {n} samples a "
          f"step), roofline costs; paper (Figure 3, 1.5B, G 6, L 300): "
          f"{PAPER['figure3_training_time_ratio_1p5b_G6_L300']:.3f}")
    print(_projection_table(result["projection"]))
    print("\nThe same with the paper's Table 2 token counts (2689.5 vs 145.9 decoded a sample, 250-token prompts):")
    print(_projection_table(result["projection_paper_tokens"]))
    for v in result.get("variants", []):
        print(f"\nPOER {v['name']} ({'; '.join(v['overrides'])}) / GRPO: decoded tokens "
              f"{v['decoded_tokens_ratio']:.3f}, decode steps {v['decode_steps_ratio']:.3f}, rollout time "
              f"{v['rollout_time_ratio']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
