"""Plot training curves from one or more runs' metrics.jsonl (POER vs GRPO comparisons).

Usage (from a checkout):
    PYTHONPATH=. python scripts/plot_metrics.py WORKDIR [--out DIR] [--compare OTHER_WORKDIR ...] [--smooth N]

Writes PNGs into DIR (default WORKDIR/plots):
    reward.png           mean reward (key reward, else reward/mean or rewards/mean) vs step
    accuracy.png         rewards/accuracy/mean and eval/accuracy vs step
    response_length.png  completions/mean_length vs step
    decoded_tokens.png   tokens/decoded and tokens/decoded_full_equiv vs step
and, for runs that log time/step_s, the same curves vs cumulative wall time as <name>_vs_time.png.
With --compare every run is overlaid, labelled by its workdir name. Rows sharing a step (e.g. a train
row and an eval row) are merged; --smooth N draws a trailing N-step mean over the raw curve.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from poer_jax.train.metrics import (  # noqa: E402
    ACCURACY_KEY,
    DECODED_FULL_KEY,
    DECODED_KEY,
    EVAL_ACCURACY_KEY,
    LENGTH_KEY,
    METRICS_FILE,
    REWARD_KEYS,
    STEP_TIME_KEY,
    read_metrics,
)

# (file stem, y label, [(metric key, legend suffix)]); for reward the first key a run has is used.
FIGURES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("reward", "reward", tuple((k, "") for k in REWARD_KEYS)),
    ("accuracy", "accuracy", ((ACCURACY_KEY, "train"), (EVAL_ACCURACY_KEY, "eval"))),
    ("response_length", "mean response length (tokens)", ((LENGTH_KEY, ""),)),
    ("decoded_tokens", "decoded tokens per step", ((DECODED_KEY, "decoded"), (DECODED_FULL_KEY, "full-rollout equiv"))),
)


@dataclass
class Run:
    label: str
    steps: np.ndarray  # int [S], ascending, unique
    columns: dict[str, np.ndarray]  # key -> float [S], NaN where the step has no value
    wall_s: np.ndarray | None  # cumulative seconds at the end of each step, when time/step_s is logged


def load_run(workdir: str, label: str) -> Run:
    """Read ``workdir/metrics.jsonl``; rows of one step are merged, later keys winning."""
    path = os.path.join(workdir, METRICS_FILE)
    by_step: dict[int, dict[str, float]] = {}
    for row in read_metrics(path):
        merged = by_step.setdefault(row["step"], {})
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float | type(None)):
                continue
            merged[key] = math.nan if value is None else float(value)
    if not by_step:
        raise ValueError(f"{path}: no metric rows")
    steps = np.array(sorted(by_step), dtype=np.int64)
    keys = sorted({k for row in by_step.values() for k in row})
    columns = {k: np.array([by_step[s].get(k, math.nan) for s in steps], dtype=np.float64) for k in keys}
    wall = None
    if STEP_TIME_KEY in columns:
        dt = columns[STEP_TIME_KEY]
        wall = np.cumsum(np.where(np.isfinite(dt), dt, 0.0))
    return Run(label, steps, columns, wall)


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Workdir basenames, or full paths when two basenames clash."""
    names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def trailing_mean(y: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` finite values up to each point (NaNs skipped, not propagated)."""
    finite = np.isfinite(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, y, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(finite)])
    lo = np.maximum(np.arange(1, len(y) + 1) - window, 0)
    hi = np.arange(1, len(y) + 1)
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def _series(run: Run, stem: str, keys: tuple[tuple[str, str], ...]) -> list[tuple[str, np.ndarray]]:
    present = [(k, suffix) for k, suffix in keys if k in run.columns]
    if stem == "reward":
        present = present[:1]
    return [(k if not suffix else suffix, run.columns[k]) for k, suffix in present]


def plot_figure(runs: Sequence[Run], stem: str, ylabel: str, keys: tuple[tuple[str, str], ...], out_dir: str,
                vs_time: bool, smooth: int) -> str | None:
    """Write one PNG; returns its path, or None when no run has any of ``keys`` (or time, for vs_time)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    longest = max((float(r.wall_s[-1]) for r in runs if r.wall_s is not None), default=0.0)
    unit, div = ("s", 1.0) if longest < 120 else ("min", 60.0) if longest < 7200 else ("h", 3600.0)
    for i, run in enumerate(runs):
        if vs_time and run.wall_s is None:
            continue
        x = run.wall_s / div if vs_time else run.steps
        color = f"C{i}"
        for j, (name, y) in enumerate(_series(run, stem, keys)):
            ok = np.isfinite(y)
            if not ok.any():
                continue
            if len(runs) == 1:
                label = name
            else:
                label = f"{run.label} ({name})" if stem != "reward" and len(keys) > 1 else run.label
            style = "-" if j == 0 else "--"
            sparse = ok.sum() < 0.5 * len(y)  # e.g. eval every k steps: connect the points that exist
            if smooth > 1 and not sparse:
                ax.plot(x[ok], y[ok], style, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(x, trailing_mean(y, smooth), style, color=color, label=label)
            else:
                ax.plot(x[ok], y[ok], style, color=color, label=label, marker="o" if sparse else None,
                        markersize=3)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(f"wall time ({unit})" if vs_time else "step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{stem}_vs_time.png" if vs_time else f"{stem}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(workdirs: Sequence[str], out_dir: str, smooth: int = 1) -> list[str]:
    runs = [load_run(w, label) for w, label in zip(workdirs, run_labels(workdirs))]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, ylabel, keys in FIGURES:
        for vs_time in (False, True):
            path = plot_figure(runs, stem, ylabel, keys, out_dir, vs_time, smooth)
            if path is not None:
                written.append(path)
    if not written:
        known = sorted({k for _, _, keys in FIGURES for k, _ in keys})
        raise ValueError(f"none of the plotted metrics {known} appear in "
                         f"{', '.join(os.path.join(w, METRICS_FILE) for w in workdirs)}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory for PNGs (default WORKDIR/plots)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="WORKDIR", help="more runs to overlay")
    parser.add_argument("--smooth", type=int, default=1, help="trailing-mean window in steps (1 = raw)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    out_dir = args.out or os.path.join(args.workdir, "plots")
    try:
        written = plot_runs([args.workdir, *args.compare], out_dir, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
