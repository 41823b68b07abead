"""Console progress: a tqdm bar on a terminal, a plain line every N steps otherwise (CI and batch logs).

Both show the step, ETA and the key numbers: reward, training accuracy, mean response length, decoded
tokens per second and the rollout's decode steps (its critical path: a batched decode runs until its longest
sample stops). ETA = elapsed / (steps done in this process) * (steps left), so a resumed run's ETA is
not skewed by the steps a previous process did. :class:`TaskProgress` does the same for the phases before
the first step (warm start, cache-pool fill), which would otherwise be minutes of silence, and
:class:`TqdmLoggingHandler` prints log records above a live bar instead of gluing them onto it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from poer_jax.train.metrics import (
    ACCURACY_KEY,
    DECODE_STEPS_KEY,
    DECODED_KEY,
    EVAL_ACCURACY_KEY,
    LENGTH_KEY,
    REWARD_KEYS,
    STEP_TIME_KEY,
    TOKENS_PER_S_KEY,
)


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def _si(value: float) -> str:
    """3 significant digits with a k/M/G suffix: 1234 -> 1.23k."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def tokens_per_second(metrics: Mapping[str, Any]) -> float | None:
    """``tokens/decoded_per_s`` if logged, else ``tokens/decoded / time/step_s``."""
    rate = _number(metrics, TOKENS_PER_S_KEY)
    if rate is not None:
        return rate
    decoded, dt = _number(metrics, DECODED_KEY), _number(metrics, STEP_TIME_KEY)
    if decoded is None or dt is None or dt <= 0:
        return None
    return decoded / dt


def key_numbers(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) for the headline metrics present in ``metrics``, in display order."""
    out = []
    reward = next((v for v in (_number(metrics, k) for k in REWARD_KEYS) if v is not None), None)
    if reward is not None:
        out.append(("reward", f"{reward:.3f}"))
    for label, key in (("acc", ACCURACY_KEY), ("eval_acc", EVAL_ACCURACY_KEY)):
        value = _number(metrics, key)
        if value is not None:
            out.append((label, f"{value:.3f}"))
    length = _number(metrics, LENGTH_KEY)
    if length is not None:
        out.append(("len", f"{length:.1f}"))
    rate = tokens_per_second(metrics)
    if rate is not None:
        out.append(("tok/s", _si(rate)))
    steps = _number(metrics, DECODE_STEPS_KEY)
    if steps is not None:
        out.append(("dsteps", f"{steps:.0f}"))
    return out


def format_step_line(step: int, total: int, metrics: Mapping[str, Any], elapsed_s: float, *,
                     initial_step: int = 0) -> str:
    """``step 50/200 (25.0%) | reward 0.512 | acc 0.480 | len 312.4 | tok/s 1.23k | dsteps 255 | 0:01:40 < 0:05:00``.

    ``elapsed_s`` is the time spent on steps ``initial_step+1 .. step`` (this process); the ETA after ``<``
    is ``elapsed_s / (step - initial_step) * (total - step)``, ``?`` before the first step.
    """
    pct = 100.0 * step / total if total > 0 else 0.0
    parts = [f"step {step}/{total} ({pct:.1f}%)"]
    parts += [f"{label} {value}" for label, value in key_numbers(metrics)]
    done = step - initial_step
    eta = elapsed_s / done * max(total - step, 0) if done > 0 else math.nan
    parts.append(f"{format_duration(elapsed_s)} < {format_duration(eta)}")
    return " | ".join(parts)


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


class Progress:
    """Progress over steps ``initial_step+1 .. total_steps``.

    ``use_tqdm=None`` picks tqdm when ``stream`` (default stderr) is a terminal; otherwise
    :func:`format_step_line` is printed every ``every`` steps and at the last step.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, *, every: int = 10, stream: TextIO | None = None,
                 use_tqdm: bool | None = None) -> None:
        if total_steps < 0 or not 0 <= initial_step <= max(total_steps, 0):
            raise ValueError(f"progress: need 0 <= initial_step <= total_steps, got {initial_step}, {total_steps}")
        if every < 1:
            raise ValueError(f"progress: every must be >= 1, got {every}")
        self.total_steps = int(total_steps)
        self.initial_step = int(initial_step)
        self.every = int(every)
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.monotonic()
        self._step = self.initial_step
        self._bar = None
        if use_tqdm is None:
            use_tqdm = _is_tty(self.stream)
        if use_tqdm:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.initial_step, file=self.stream, unit="step",
                             dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        step = int(step)
        if self._bar is not None:
            self._bar.update(max(step - self._step, 0))
            self._bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in key_numbers(metrics)), refresh=True)
        elif step % self.every == 0 or step == self.total_steps:
            line = format_step_line(step, self.total_steps, metrics, time.monotonic() - self._start,
                                    initial_step=self.initial_step)
            print(line, file=self.stream, flush=True)
        self._step = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TaskProgress:
    """Progress of one phase of known length (``warm start``, ``cache pool``): a tqdm bar on a terminal,
    otherwise a log line at every tenth of the way (and at the end)."""

    def __init__(self, desc: str, total: int, *, unit: str = "it", stream: TextIO | None = None,
                 use_tqdm: bool | None = None, logger: logging.Logger | None = None, quiet: bool = False) -> None:
        self.desc, self.total, self.unit, self.quiet = desc, int(total), unit, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.log = logger or logging.getLogger("poer_jax")
        self._done, self._next_line, self._start = 0, max(1, self.total // 10), time.monotonic()
        self._bar = None
        if not quiet and (use_tqdm if use_tqdm is not None else _is_tty(self.stream)):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=self.stream, unit=unit, dynamic_ncols=True,
                             leave=False)

    def update(self, done: int, note: str = "") -> None:
        """``done`` of ``total`` finished; ``note`` (e.g. "loss 0.41") is shown with it."""
        done = min(int(done), self.total)
        if self.quiet:
            pass
        elif self._bar is not None:
            self._bar.update(done - self._done)
            if note:
                self._bar.set_postfix_str(note, refresh=True)
        elif done >= self._next_line or done == self.total:
            elapsed = time.monotonic() - self._start
            eta = elapsed / done * (self.total - done) if done else math.nan
            self.log.info("%s: %d/%d %s (%.0f%%)%s | %s < %s", self.desc, done, self.total, self.unit,
                          100.0 * done / max(self.total, 1), f" | {note}" if note else "",
                          format_duration(elapsed), format_duration(eta))
            while self._next_line <= done:
                self._next_line += max(1, self.total // 10)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TqdmLoggingHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write`` so a record lands on its own line above any
    live bar (a plain ``StreamHandler`` writes into the bar's line). Without tqdm bars it is a plain
    stream handler. Without a stream it writes to whatever ``sys.stderr`` is at the time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr
        try:
            from tqdm import tqdm

            if getattr(tqdm, "_instances", None):
                tqdm.write(self.format(record), file=self.stream)
                self.flush()
                return
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
            return
        super().emit(record)
