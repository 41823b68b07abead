"""Reward computation in worker processes, every call bounded by a per-item deadline.

math-verify can take unbounded time on adversarial LaTeX (sympy simplification), and its own timeout
uses ``signal.alarm`` which only works on a main thread; user reward functions can hang too. So rewards
run in a small pool of worker processes and the parent enforces the deadline:

* the unit of work is one (completion, reward function) call; the worker reports after each call, and
  the parent's clock for the next call starts then, so each call gets ``timeout_s`` seconds;
* a call past its deadline gets ``timeout_reward`` (default 0.0) and is counted in ``timeouts``; the
  worker running it is killed (SIGKILL) and replaced, and the item's remaining functions are re-queued
  on another worker, so one hung item never stalls the step. When a grading reward (accuracy, cosine)
  hangs, the other grading rewards of that item are not retried: they would hang on the same parse;
* a worker that dies (segfault, ``os._exit``) is replaced the same way and its call counts as an error;
* ``compute(..., deadline_s=T)`` also bounds the whole batch: calls not finished T seconds after it
  started (running or still queued) get ``timeout_reward``, are counted as timeouts and in
  ``RewardResult.deadline_cut``, and the busy workers are replaced. Without it a batch can take
  (completions x functions x timeout_s / num_workers) when every call hangs.

A call that raises or returns something other than a number or None is an error: ``on_error="raise"``
raises :class:`RewardFunctionError` after the batch (naming the function, the completion and the
traceback); ``"zero"`` records ``error_reward`` (0), counts it, and keeps each function's first traceback
in ``RewardResult.first_errors`` for the caller to log. A non-finite number (NaN or +-inf alike) is a bad
value under the same policy: ``"raise"`` stops, ``"zero"`` gives that completion ``error_reward`` for the
function and counts it in ``RewardResult.non_finite`` (its first occurrence goes to ``first_errors``), so
the sum, the per-function means and everything derived from them stay finite.

Start-up is cheap: the default ``forkserver`` context preloads math-verify and this package once in the
fork server, so starting or replacing a worker is a fork (milliseconds), and it is safe to use from a
process that already runs JAX threads (the fork server is a fresh interpreter, not a fork of the
parent). As with ``spawn``, the entry script must guard its main code with ``if __name__ ==
"__main__":``. ``num_workers=0`` evaluates in-process with no deadline (debugging only).

The weighted sum follows TRL: total = nansum_j(w_j * r_j), where a function's None (not applicable)
is NaN and so excluded (``none_policy="nan"``), or 0 (``none_policy="zero"``).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from poer_jax.rewards.functions import (
    BUILTIN_REWARDS,
    GRADE_REWARDS,
    RewardItem,
    resolve_reward,
    reward_name,
)
from poer_jax.train.reward_result import RewardFunctionError, RewardResult, RewardSpec

__all__ = ["RewardFunctionError", "RewardPool", "RewardResult", "RewardSpec"]

_PRELOAD = ["poer_jax.train.reward_pool", "math_verify"]  # answers.py imports math-verify on first use


def _worker_main(conn: Any, specs: list[tuple[str, dict[str, Any]]], sys_path: list[str]) -> None:
    """Worker loop: resolve the functions once, then run (item, function indices) tasks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for p in sys_path:
        if p not in sys.path:
            sys.path.append(p)
    try:
        fns = [resolve_reward(name, kwargs) for name, kwargs in specs]
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, payload, fn_indices = msg
        item = RewardItem(**payload)
        for j in fn_indices:
            try:
                value = fns[j](item)
                status = "ok"
            except Exception:
                value, status = traceback.format_exc(), "error"
            conn.send((index, j, status, value))


class _Worker:
    """One worker process, its pipe, and the task it is running (item, remaining functions, clock)."""

    def __init__(self, ctx: Any, specs: list[tuple[str, dict[str, Any]]]) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, specs, list(sys.path)), daemon=True)
        self.process.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        self.conn = parent_conn
        self.ready = False
        self.started_at = time.monotonic()
        self.item: int | None = None
        self.fns: list[int] = []
        self.clock = 0.0

    @property
    def busy(self) -> bool:
        return self.item is not None

    def assign(self, index: int, payload: dict[str, Any], fns: list[int]) -> None:
        self.conn.send((index, payload, fns))
        self.item, self.fns, self.clock = index, list(fns), time.monotonic()

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=5.0)
        finally:
            self.conn.close()


class RewardPool:
    """Computes reward functions over a batch of completions in worker processes with deadlines.

    Args:
      specs: the reward functions (``RewardSpec`` or plain names, weight 1).
      num_workers: worker processes (0: in-process, no deadline).
      timeout_s: deadline of one (completion, function) call, in seconds.
      timeout_reward: the value given to a call that timed out (NaN excludes it from the sum).
      error_reward / on_error: a call that raises is an error; "raise" raises ``RewardFunctionError``
        (after the step, naming the function, the completion and the traceback), "zero" (or its old name
        "default") records ``error_reward`` and counts it.
      none_policy: a None reward is NaN (excluded from the sum and the means, TRL) or "zero".
      start_method: "forkserver" (default) or "spawn".
      startup_timeout_s: how long a new worker may take to import and resolve the functions.
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec | str],
        num_workers: int = 2,
        timeout_s: float = 10.0,
        timeout_reward: float = 0.0,
        error_reward: float = 0.0,
        on_error: str = "raise",
        none_policy: str = "nan",
        start_method: str = "forkserver",
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.specs = [RewardSpec(s) if isinstance(s, str) else s for s in specs]
        if not self.specs:
            raise ValueError("RewardPool needs at least one reward function")
        if on_error not in ("raise", "zero", "default"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        if none_policy not in ("nan", "zero"):
            raise ValueError(f"none_policy must be 'nan' or 'zero', got {none_policy!r}")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        if timeout_s <= 0 or num_workers < 0:
            raise ValueError(f"need timeout_s > 0 and num_workers >= 0, got {timeout_s}, {num_workers}")
        self.names = _unique_names([reward_name(s.name) for s in self.specs])
        self.weights = np.asarray([float(s.weight) for s in self.specs], dtype=np.float64)
        self.num_workers, self.timeout_s = num_workers, float(timeout_s)
        self.timeout_reward, self.error_reward = float(timeout_reward), float(error_reward)
        self.on_error, self.none_policy = on_error, none_policy
        self.startup_timeout_s = float(startup_timeout_s)
        self._grading = [s.name in GRADE_REWARDS for s in self.specs]
        self._has_user_fns = any(s.name not in BUILTIN_REWARDS for s in self.specs)
        self._spec_args = [(s.name, dict(s.kwargs)) for s in self.specs]
        # Resolve once here so a bad name, path or option fails now, in the caller, with a clear error.
        self._local_fns = [resolve_reward(name, kwargs) for name, kwargs in self._spec_args]
        self._workers: list[_Worker] = []
        if num_workers > 0:
            self._ctx = mp.get_context(start_method)
            if start_method == "forkserver":
                self._ctx.set_forkserver_preload(_PRELOAD)
            self._workers = [_Worker(self._ctx, self._spec_args) for _ in range(num_workers)]

    # ----------------------------------------------------------------------------------------------
    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in workers:
            w.process.join(timeout=1.0)
            if w.process.is_alive():
                w.kill()
            else:
                w.conn.close()

    def worker_pids(self) -> list[int | None]:
        return [w.process.pid for w in self._workers]

    # ----------------------------------------------------------------------------------------------
    def compute(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        columns: Mapping[str, Sequence[Any]] | None = None,
        completion_lengths: Sequence[int] | None = None,
        deadline_s: float | None = None,
    ) -> RewardResult:
        """Score ``completions[i]`` (with ``prompts[i]``, token ids, and ``columns[c][i]``) with every
        function. Returns per-function arrays [N, F] and their weighted sum [N]. ``deadline_s`` bounds the
        whole batch (worker mode only); each call is bounded by ``timeout_s`` either way.

        Token lengths (the cosine reward) are ``completion_lengths[i]`` when given, else
        ``len(completion_ids[i])``; the ids themselves are only shipped to workers for user functions.
        """
        n = len(completions)
        columns = dict(columns or {})
        _check_len("prompts", prompts, n)
        if completion_ids is not None:
            _check_len("completion_ids", completion_ids, n)
        if completion_lengths is not None:
            _check_len("completion_lengths", completion_lengths, n)
        for name, values in columns.items():
            _check_len(f"column {name!r}", values, n)
        send_ids = completion_ids is not None and self._has_user_fns
        payloads = []
        for i in range(n):
            if completion_lengths is not None:
                num_tokens: int | None = int(completion_lengths[i])
            else:
                num_tokens = None if completion_ids is None else len(completion_ids[i])
            ids = [int(t) for t in completion_ids[i]] if send_ids else None  # type: ignore[index]
            payloads.append(
                {
                    "prompt": prompts[i],
                    "completion": completions[i],
                    "completion_ids": ids,
                    "num_tokens": num_tokens,
                    "columns": {c: v[i] for c, v in columns.items()},
                }
            )
        f = len(self.specs)
        values = np.full((n, f), np.nan)
        status = np.zeros((n, f), dtype=np.int8)  # 0 pending, 1 ok, 2 none, 3 timeout, 4 error, 5 non-finite
        errors: list[tuple[str, str]] = []
        cut = 0
        if self.num_workers == 0:
            for i, p in enumerate(payloads):
                item = RewardItem(**p)
                for j, fn in enumerate(self._local_fns):
                    try:
                        self._record(values, status, i, j, "ok", fn(item), errors)
                    except Exception:
                        self._record(values, status, i, j, "error", traceback.format_exc(), errors)
        else:
            try:
                cut = self._run(payloads, values, status, errors, deadline_s)
            except BaseException:
                self._abort_busy()
                raise
        if errors and self.on_error == "raise":
            raise RewardFunctionError(errors[0][1])
        if self.none_policy == "zero":
            values[status == 2] = 0.0
        total = np.nansum(values * self.weights[None, :], axis=1)
        count = {
            k: {name: int((status[:, j] == k).sum()) for j, name in enumerate(self.names)} for k in (2, 3, 4, 5)
        }
        first: dict[str, str] = {}
        for name, message in errors:
            first.setdefault(name, message)
        mask = status == 5
        return RewardResult(
            list(self.names), self.weights.copy(), values, total, count[3], count[4], count[2], first, cut,
            non_finite=count[5], non_finite_mask=mask if mask.any() else None,
        )

    def _record(
        self, values: np.ndarray, status: np.ndarray, i: int, j: int, kind: str, value: Any,
        errors: list[tuple[str, str]],
    ) -> None:
        if kind == "ok":
            if value is None:
                status[i, j] = 2
                return
            try:
                number = float(value)
            except (TypeError, ValueError):
                value = f"returned {value!r:.100}, expected a float or None"
            else:
                if np.isfinite(number):
                    values[i, j], status[i, j] = number, 1
                    return
                values[i, j], status[i, j] = self.error_reward, 5
                errors.append((self.names[j], f"reward function {self.specs[j].name!r} returned {number} on "
                               f"completion {i} (NaN and inf are failures, like an exception)"))
                return
        if kind == "timeout":
            values[i, j], status[i, j] = self.timeout_reward, 3
            return
        values[i, j], status[i, j] = self.error_reward, 4
        errors.append((self.names[j], f"reward function {self.specs[j].name!r} failed on completion {i}: {value}"))

    def _run(
        self, payloads: list[dict[str, Any]], values: np.ndarray, status: np.ndarray, errors: list[tuple[str, str]],
        deadline_s: float | None = None,
    ) -> int:
        """Run every (item, function) call on the workers; returns how many the batch deadline cut."""
        queue: deque[tuple[int, list[int]]] = deque(
            (i, list(range(len(self.specs)))) for i in range(len(payloads))
        )
        end = time.monotonic() + deadline_s if deadline_s is not None else None
        while queue or any(w.busy for w in self._workers):
            for w in self._workers:
                if w.ready and not w.busy and queue:
                    index, fns = queue.popleft()
                    w.assign(index, payloads[index], fns)
            now = time.monotonic()
            deadlines = [w.clock + self.timeout_s for w in self._workers if w.busy]
            deadlines += [w.started_at + self.startup_timeout_s for w in self._workers if not w.ready]
            deadlines += [end] if end is not None else []
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            ready = mp_connection.wait([w.conn for w in self._workers], timeout=wait_s)
            for w in list(self._workers):
                if w.conn in ready:
                    self._drain(w, values, status, errors, queue)
            now = time.monotonic()
            if end is not None and now >= end:
                return self._cut(values, status, errors, queue)
            for w in list(self._workers):
                if w.busy and now - w.clock > self.timeout_s:
                    self._drain(w, values, status, errors, queue)  # a result may have just arrived
                    if w.busy and w in self._workers:
                        self._timeout(w, values, status, errors, queue)
                elif not w.ready and now - w.started_at > self.startup_timeout_s:
                    raise RuntimeError(f"reward worker did not start within {self.startup_timeout_s:.0f} s")
        return 0

    def _cut(
        self, values: np.ndarray, status: np.ndarray, errors: list[tuple[str, str]],
        queue: deque[tuple[int, list[int]]],
    ) -> int:
        """The batch deadline passed: every call not done is a timeout; busy workers are replaced."""
        cut = 0
        for w in list(self._workers):
            if w.busy:
                self._drain(w, values, status, errors, queue)
            if w.busy and w in self._workers:
                for j in w.fns:
                    self._record(values, status, w.item, j, "timeout", None, errors)
                    cut += 1
                self._replace(w)
        while queue:
            index, fns = queue.popleft()
            for j in fns:
                self._record(values, status, index, j, "timeout", None, errors)
                cut += 1
        return cut

    def _drain(
        self,
        w: _Worker,
        values: np.ndarray,
        status: np.ndarray,
        errors: list[tuple[str, str]],
        queue: deque[tuple[int, list[int]]],
    ) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    continue
                if msg[0] == "init_error":
                    raise RuntimeError(f"reward worker failed to load the reward functions:\n{msg[1]}")
                index, j, kind, value = msg
                self._record(values, status, index, j, kind, value, errors)
                w.fns.remove(j)
                w.clock = time.monotonic()
                if not w.fns:
                    w.item = None
        except (EOFError, OSError):
            # The worker died: its current call is an error, the rest of its item goes back in the queue.
            if w.busy:
                j, rest = w.fns[0], w.fns[1:]
                self._record(values, status, w.item, j, "error", "the worker process died", errors)
                if rest:
                    queue.appendleft((w.item, rest))
            self._replace(w)

    def _timeout(
        self,
        w: _Worker,
        values: np.ndarray,
        status: np.ndarray,
        errors: list[tuple[str, str]],
        queue: deque[tuple[int, list[int]]],
    ) -> None:
        index, j, rest = w.item, w.fns[0], w.fns[1:]
        self._record(values, status, index, j, "timeout", None, errors)
        if self._grading[j]:
            for k in [k for k in rest if self._grading[k]]:
                self._record(values, status, index, k, "timeout", None, errors)
                rest.remove(k)
        if rest:
            queue.appendleft((index, rest))
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self._spec_args)

    def _abort_busy(self) -> None:
        """After an exception mid-step, replace busy workers so stale results never leak into a step."""
        for w in list(self._workers):
            if w.busy or not w.process.is_alive():
                self._replace(w)


def _check_len(name: str, values: Sequence[Any], n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} completions")


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
