"""Console output of a long phase: a tqdm bar on a terminal, a log line every tenth of the way otherwise (CI and
batch logs), and a logging handler that prints records above a live bar instead of gluing them onto it.

:class:`TaskProgress` shows the phases before a run's first step (warm start, cache-pool fill), which would
otherwise be minutes of silence; the training steps' own progress is ``poer_jax.train.progress``. A leaf
module: it imports nothing of poer_jax.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


def is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


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
        if not quiet and (use_tqdm if use_tqdm is not None else is_tty(self.stream)):
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
