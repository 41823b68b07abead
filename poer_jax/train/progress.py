"""Console progress: a tqdm bar on a terminal, a plain line every N steps otherwise (CI and batch logs).

Both show the step, ETA and the key numbers: reward, training accuracy, mean response length, decoded
tokens per second and the rollout's decode steps (its critical path: a batched decode runs until its longest
sample stops). ETA = elapsed / (steps done in this process) * (steps left), so a resumed run's ETA is
not skewed by the steps a previous process did. The phases before the first step (warm start, cache-pool
fill) have their own bar (``poer_jax.console.TaskProgress``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from poer_jax.console import format_duration, is_tty
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
            use_tqdm = is_tty(self.stream)
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
