"""Per-step training metrics: ``workdir/metrics.jsonl`` (one JSON object per line) plus TensorBoard scalars.

Line format: ``{"step": 12, "reward/mean": 0.4, ...}``. Values are JSON numbers; NaN and +-inf, which
strict JSON cannot hold, are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (``json.loads`` reads
them back as strings and ``float()`` turns them back into floats; :func:`read_metrics` does that).

Resume: ``MetricsWriter(workdir, resume_step=s)`` keeps the lines with ``step <= s`` (the state a checkpoint
at step ``s`` has seen) and drops the rest, rewriting the file atomically, so the file of a run killed and
resumed from its checkpoint equals that of an uninterrupted run. ``resume_step=None`` is a fresh start and
drops every existing line. TensorBoard gets ``purge_step = s + 1`` so its viewer hides the dropped steps too.

This module imports neither jax nor tensorboardX at import time, so scripts/plot_metrics.py stays light.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from poer_jax.jsonl import parse_json_object

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TB_DIR = "tb"

# Canonical metric names shared by the trainer, the progress line and scripts/plot_metrics.py.
REWARD_KEYS = ("reward", "reward/mean", "rewards/mean")  # mean raw reward; the first present wins
ACCURACY_KEY = "rewards/accuracy/mean"
EVAL_ACCURACY_KEY = "eval/accuracy"
LENGTH_KEY = "completions/mean_length"
DECODED_KEY = "tokens/decoded"
DECODED_FULL_KEY = "tokens/decoded_full_equiv"
TOKENS_PER_S_KEY = "tokens/decoded_per_s"
STEP_TIME_KEY = "time/step_s"
DECODE_STEPS_KEY = "rollout/decode_steps"  # the rollout's critical path (train/step_metrics.py)

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_tb_missing_warned = False


def encode_value(key: str, value: Any) -> int | float | str:
    """A host scalar as a JSON value: int, float, or "nan" / "inf" / "-inf"."""
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
    else:
        arr = np.asarray(value)  # 0-d numpy / jax arrays; one host read per metric per step
        if arr.ndim != 0 or arr.dtype.kind not in "biuf":
            raise ValueError(f"metrics: key {key!r} must be a scalar int or float, got {type(value).__name__} "
                             f"with shape {arr.shape} and dtype {arr.dtype}")
        return encode_value(key, arr.item())
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def split_finite(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(finite, left_out)``: the metrics whose value is a finite number, and the names of the others (NaN,
    inf). The trainer writes only the first to metrics.jsonl, so that every value there is a number a plot
    can draw, and names the second in a warning (a skipped update's loss, for one)."""
    finite: dict[str, Any] = {}
    left_out: list[str] = []
    for key, value in metrics.items():
        v = encode_value(key, value)
        if isinstance(v, str):
            left_out.append(key)
        else:
            finite[key] = value
    return finite, left_out


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value` for the non-finite strings; other values pass through."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return value


def parse_line(line: str, where: str) -> dict[str, Any]:
    """One metrics.jsonl line as a dict with an int ``step`` and decoded values; ``where`` is ``file:line``."""
    row = parse_json_object(line, where)
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: missing or non-integer 'step' (got {step!r})")
    return {k: decode_value(v) for k, v in row.items()}


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file, in file order.

    A final line without its newline that does not parse is the tail of a write cut short by a kill; it
    is skipped with a warning. Any other bad line raises ``ValueError`` naming ``file:line``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics: no such file {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(parse_line(line, f"{path}:{i + 1}"))
        except ValueError:
            if i == len(lines) - 1:  # the text did not end with "\n": an interrupted write
                warnings.warn(f"{path}:{i + 1}: skipping an incomplete last line", stacklevel=2)
                continue
            raise
    return rows


def _rewrite_atomically(path: str, lines: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def truncate_jsonl(path: str, resume_step: int | None) -> int:
    """Keep the lines of a per-step JSONL file (``{"step": s, ...}``) with ``step <= resume_step``; drop the
    rest (all of them for ``resume_step=None``) and a last line cut short by a kill. Atomic; returns the
    number of lines dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    keep, dropped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = parse_line(line, f"{path}:{i + 1}")
        except ValueError:
            if i == len(lines) - 1:  # cut short by the kill that we are resuming from
                dropped += 1
                continue
            raise
        if resume_step is not None and row["step"] <= resume_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        if resume_step is None:
            log.warning("dropping %d line(s) of %s written by a run that never reached a checkpoint (it starts "
                        "again from step 0)", dropped, path)
        else:
            log.warning("dropping %d line(s) of %s after step %d, the checkpoint resumed from", dropped, path,
                        resume_step)
    if dropped or lines[-1] != "":
        _rewrite_atomically(path, keep)
    return dropped


class SamplesWriter:
    """``workdir/samples.jsonl``: one line per logged group, ``{"step": s, "prompt": ..., "completions":
    [{"text": ..., "reward": ..., "length": ..., "prefix_length": ...}], ...}`` (GRPO), or, under POER, the
    shared cached prefix once (``"prefix": {"length", "tail", "text"}``) and per completion ``{"continuation",
    "length", "reward", "correct"}`` (``poer_jax.train.report.sample_group``); truncated on resume like
    metrics.jsonl."""

    def __init__(self, workdir: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = os.path.join(os.fspath(workdir), SAMPLES_FILE)
        truncate_jsonl(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        row = {"step": int(step), **record}
        self._file.write(json.dumps(row, allow_nan=False, default=_json_default) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return encode_value("sample", value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _import_summary_writer() -> Any:
    """tensorboardX's ``SummaryWriter``, imported without torch.

    tensorboardX imports torch when it is installed (2 s or more at every start-up) only to accept torch
    tensors; we log Python floats. Unless torch is already loaded, the import sees it as missing (tensorboardX
    handles that), and torch is importable again afterwards.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes ``import torch`` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _make_tb_writer(logdir: str, purge_step: int | None) -> Any:
    global _tb_missing_warned
    try:
        SummaryWriter = _import_summary_writer()
    except ImportError:
        if not _tb_missing_warned:
            _tb_missing_warned = True
            warnings.warn("tensorboardX is not installed: TensorBoard logging is off (metrics.jsonl is still "
                          "written); pip install tensorboardX", stacklevel=3)
        return None
    return SummaryWriter(logdir=logdir, purge_step=purge_step)


class MetricsWriter:
    """Append ``{"step": step, **metrics}`` lines to ``workdir/metrics.jsonl`` and scalars to ``workdir/tb``.

    Steps must be non-decreasing (several writes for one step, e.g. train then eval, are fine). Each line
    is flushed as it is written, so a killed run loses at most the line being written.
    """

    def __init__(self, workdir: str | os.PathLike[str], resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self._last_step = -1 if resume_step is None else int(resume_step)
        self._truncate_for_resume(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        self._tb = None
        if tensorboard:
            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = _make_tb_writer(os.path.join(self.workdir, TB_DIR), purge)

    def _truncate_for_resume(self, resume_step: int | None) -> None:
        truncate_jsonl(self.path, resume_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        step = int(step)
        if step < self._last_step:
            raise ValueError(f"metrics: step {step} written after step {self._last_step} to {self.path}")
        if "step" in metrics:
            raise ValueError("metrics: 'step' is reserved for the step number; rename the metric")
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise ValueError(f"metrics: keys must be str, got {key!r}")
            row[key] = encode_value(key, value)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        self._last_step = step
        if self._tb is not None:
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(key, float(decode_value(value)), global_step=step)
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
