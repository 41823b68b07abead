"""``python scripts/plan.py --config=FILE --target=NAME [--config.KEY=VALUE ...] [--json F]``.

Compiles the config's programs for the target (nothing runs, nothing is allocated) and prints per program
and per device: arguments / outputs / aliases / temporaries, the peak with the resident set against the
target's memory, FLOPs, bytes accessed and roofline time per call, compile time and the number of shapes a run
compiles; then a GRPO and a POER step priced from those calls next to the analytic projection. Exit status: 0
when every program fits, 1 when one does not (named, with the config keys that size it), 2 for a bad command
line, config or target, or a compiler that is not installed (the message says how to install it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from poer_jax.plan.compile import PlanError
from poer_jax.plan.targets import get_target
from poer_jax.system.config import ConfigError, config_from_argv

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_ERROR = 0, 1, 2


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="plan.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True,
                    help="e.g. tpu-v5p-8, tpu-v6e-8, h100-80gb-1, h200-141gb-8, '2x h100-80gb-8', cpu-8")
    ap.add_argument("--json", default=None, help="also write the report as JSON to this file")
    ap.add_argument("--memory-fraction", type=float, default=0.95,
                    help="usable share of each device's memory (runtime reservations, fragmentation)")
    ap.add_argument("--num-questions", type=int, default=None,
                    help="training questions (cache-pool rows); default: data.train_path's rows, else 7000")
    ap.add_argument("--programs", default=None, help="comma-separated subset, e.g. train/update")
    args, rest = ap.parse_known_args(list(argv))
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    from poer_jax.plan.build import plan_config

    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        target = get_target(args.target)
        cfg = config_from_argv(rest)
        if not 0 < args.memory_fraction <= 1:
            raise ConfigError(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
        report = plan_config(cfg, target, num_questions=args.num_questions, memory_fraction=args.memory_fraction,
                             programs=args.programs.split(",") if args.programs else None,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyError as e:  # unknown target: the message lists the known ones
        print(f"plan: {e.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    except (ConfigError, PlanError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(report.table())
    if args.json:
        out = {"config": rest, **report.to_json()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return EXIT_FITS if report.fits else EXIT_DOES_NOT_FIT
