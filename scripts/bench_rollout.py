"""POER vs full-rollout GRPO on the same model, data and seed, in one process (paper Table 2 / Figure 3).

    PYTHONPATH=. python scripts/bench_rollout.py --config=configs/toy.py [--steps 5] [--json PATH]
        [--sweep-L 4,8,16] [--sweep-G 4,6,8] [--config.KEY=VALUE ...]

Runs a few training steps with rollout.strategy=poer and with rollout.strategy=full from the same
starting model (the toy task and warm start are prepared once and shared), then prints a table and
writes JSON: decoded and prefilled tokens per sample (counted by the sampler), rollout / update / step
wall time (measured: the median over the steps after the first, so that the compiles of new shape buckets do
not count), and the POER/GRPO ratios
``decoded_tokens_ratio``, ``rollout_time_ratio``, ``step_time_ratio``. ``--sweep-L`` repeats POER for
several maximum truncation lengths L (Table 2), ``--sweep-G`` both strategies for several group sizes
(Figure 3). The POER cache pool is initialised before timing starts (reported as ``cache_init_s``).
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
         "figure3_training_time_ratio_1p5b_G6_L300": 0.074}


def _prepare(cfg: Any, base: Path) -> Any:
    """Generate the toy task / run the warm start once; later runs load the result."""
    from poer_jax.train import setup
    from poer_jax.train.config import apply_overrides, validate
    from poer_jax.train.data import ColumnMap, PromptConfig, load_dataset_file, tokenize_prompts
    from poer_jax.train.loop import _warm_start_target

    cfg = apply_overrides(cfg, [f"workdir={base}"])
    if cfg.toy.enabled:
        cfg = setup.prepare_toy(cfg)
    if cfg.warm_start.steps > 0:
        tok = setup.load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        data = load_dataset_file(cfg.data.train_path, ColumnMap(cfg.data.problem_key, cfg.data.solution_key,
                                                                cfg.data.answer_key), limit=cfg.data.limit)
        pcfg = PromptConfig(chat_template=cfg.data.chat_template, max_prompt_len=cfg.data.max_prompt_len,
                            on_too_long=cfg.data.on_too_long,
                            **({"system_prompt": cfg.data.system_prompt} if cfg.data.system_prompt else {}))
        prompts = tokenize_prompts(tok, data, pcfg)
        targets = [_warm_start_target(r, cfg) for r in prompts.rows(range(len(prompts)))]
        from poer_jax.model.sharding import make_mesh

        cfg = setup.run_warm_start(cfg, tok, list(prompts.ids), targets, make_mesh({"fsdp": -1}))
    over = ["toy.enabled=false", "warm_start.steps=0", "eval.enabled=false", "train.export_final=false",
            "resume=false", "train.checkpoint_every=1000000"]
    return validate(apply_overrides(cfg, over))


def run_strategy(cfg: Any, strategy: str, steps: int, workdir: Path, extra: list[str] | None = None) -> dict:
    """``steps`` training steps with the given strategy; returns per-sample token counts and timings."""
    from poer_jax.train.config import apply_overrides, validate
    from poer_jax.train.loop import PoerTrainer

    shutil.rmtree(workdir, ignore_errors=True)
    c = validate(apply_overrides(cfg, [f"rollout.strategy={strategy}", f"workdir={workdir}",
                                       f"train.max_steps={steps}", *(extra or [])]))
    t0 = time.perf_counter()
    trainer = PoerTrainer(c)  # the cache pool is initialised here (POER)
    setup_s = time.perf_counter() - t0
    rows = []
    try:
        while trainer.step < steps:
            rows.append(trainer.train_step())
    finally:
        trainer.rewards.close()
        if trainer.grader is not trainer.rewards:
            trainer.grader.close()
        trainer.metrics.close()
        trainer.checkpointer.close()
    samples = c.data.questions_per_step * c.rollout.group_size * len(rows)
    timed = rows[1:] if len(rows) > 1 else rows  # step 1 compiles
    # medians: a step that meets a new shape bucket compiles, and one compile would dominate a mean
    mean = lambda key: float(statistics.median(r[key] for r in timed))  # noqa: E731
    return {
        "strategy": strategy, "steps": len(rows), "samples": samples,
        "group_size": c.rollout.group_size, "max_truncation": c.cache.max_truncation, "budget": c.cache.budget,
        "decoded_tokens_per_sample": sum(r["tokens/decoded"] for r in rows) / samples,
        "prefilled_tokens_per_sample": sum(r["tokens/prefilled"] for r in rows) / samples,
        "response_length": sum(r["completions/mean_length"] for r in rows) / len(rows),
        "rollout_s": mean("time/rollout_s"), "update_s": mean("time/update_s"), "reward_s": mean("time/reward_s"),
        "step_s": mean("time/step_s"), "setup_s": setup_s,
        "accuracy": sum(r.get("rewards/accuracy/mean", float("nan")) for r in rows) / len(rows),
    }


def compare(poer: dict, grpo: dict) -> dict:
    return {"decoded_tokens_ratio": poer["decoded_tokens_per_sample"] / grpo["decoded_tokens_per_sample"],
            "rollout_time_ratio": poer["rollout_s"] / grpo["rollout_s"],
            "step_time_ratio": poer["step_s"] / grpo["step_s"]}


def _table(rows: list[dict]) -> str:
    cols = [("strategy", "{}"), ("group_size", "{}"), ("max_truncation", "{}"), ("decoded_tokens_per_sample", "{:.1f}"),
            ("prefilled_tokens_per_sample", "{:.1f}"), ("response_length", "{:.1f}"), ("rollout_s", "{:.3f}"),
            ("update_s", "{:.3f}"), ("step_s", "{:.3f}")]
    head = " | ".join(name for name, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(fmt.format(r[name]).rjust(len(name)) for name, fmt in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="training steps per strategy (the first is not timed)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sweep-L", default="", help="comma-separated maximum truncation lengths for POER")
    ap.add_argument("--sweep-G", default="", help="comma-separated group sizes (both strategies)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args, rest = ap.parse_known_args(argv)

    from poer_jax.train.config import ConfigError, apply_overrides, load_config_file, validate

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

    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    cfg = _prepare(cfg, base / "base")
    import jax

    result: dict[str, Any] = {"config": config_path[0].split("=", 1)[1], "overrides": overrides,
                              "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
                              "paper": PAPER}
    poer = run_strategy(cfg, "poer", args.steps, base / "poer")
    grpo = run_strategy(cfg, "full", args.steps, base / "grpo")
    result.update(poer=poer, grpo=grpo, **compare(poer, grpo))
    rows = [poer, grpo]
    if args.sweep_L:
        result["sweep_L"] = []
        for L in (int(x) for x in args.sweep_L.split(",")):
            r = run_strategy(cfg, "poer", args.steps, base / f"poer_L{L}", [f"cache.max_truncation={L}"])
            result["sweep_L"].append({**r, **compare(r, grpo)})
            rows.append(r)
    if args.sweep_G:
        result["sweep_G"] = []
        for G in (int(x) for x in args.sweep_G.split(",")):
            p = run_strategy(cfg, "poer", args.steps, base / f"poer_G{G}", [f"rollout.group_size={G}"])
            g = run_strategy(cfg, "full", args.steps, base / f"grpo_G{G}", [f"rollout.group_size={G}"])
            result["sweep_G"].append({"group_size": G, "poer": p, "grpo": g, **compare(p, g)})
            rows += [p, g]

    print(_table(rows))
    print(f"\nPOER / GRPO: decoded tokens {result['decoded_tokens_ratio']:.3f}, "
          f"rollout time {result['rollout_time_ratio']:.3f}, step time {result['step_time_ratio']:.3f} "
          f"(paper Table 2 decoded-token ratio {PAPER['table2_decoded_per_sample']['ratio']:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
