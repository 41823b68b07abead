"""Orbax's event loops drained before they close, so a failed restore leaves no orphaned reads behind.

Orbax runs each checkpoint operation's coroutine in a fresh event loop (``asyncio_utils.run_sync``:
``loop.run_until_complete(coro)`` then ``loop.close()``, without ``asyncio.run``'s cancellation of the
tasks still pending). A restore reads every array index in its own task under one ``asyncio.gather``: when
one read fails (a data file missing) the gather raises at once, the loop is closed and the other reads
are left suspended. When the garbage collector later finalises them, each one's
``except BaseException: raise Exception(...)`` turns the ``GeneratorExit`` into an exception Python can only
print ("Exception ignored in: <coroutine _read_array_index_and_device_put>", or ``RuntimeError: Event loop
is closed`` from its ``async with`` on the dead loop): a dozen tracebacks on stderr after a fallback that
was handled.

:func:`draining_orbax_loops` swaps in a runner that, when the coroutine raises, first does what
``asyncio.run`` does at its end (cancel the loop's pending tasks, run them to their end, retrieve their
exceptions, shut down async generators), keeps the loop open for the late completions of the cancelled reads'
tensorstore operations (``_keep``) and re-raises the first error. A
coroutine that succeeds runs exactly as before. Orbax's own reason for avoiding ``asyncio.run`` (iterating
asyncio's global task set races with other threads) does not apply here: ``asyncio.all_tasks`` retries a
racing iteration, and the drain runs only on the failure path.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from orbax.checkpoint._src import asyncio_utils

__all__ = ["ORBAX_RUNNER_FOUND", "draining_orbax_loops", "run_draining"]

_T = TypeVar("_T")
_ORIGINAL = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
ORBAX_RUNNER_FOUND = _ORIGINAL is not None
_lock = threading.Lock()
_depth = 0
_KEEP = 16
_kept: list[asyncio.AbstractEventLoop] = []


def run_draining(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` in a fresh event loop; if it raises, cancel and finish the loop's other tasks
    (``asyncio.run``'s teardown), keep the loop open (``_kept``), then re-raise."""
    loop = asyncio.new_event_loop()
    failed = False
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except BaseException:
            failed = True
            _drain(loop)
            raise
    finally:
        asyncio.set_event_loop(None)
        if failed:
            _keep(loop)
        else:
            loop.close()


def _keep(loop: asyncio.AbstractEventLoop) -> None:
    """A cancelled read's tensorstore operation still runs in tensorstore's threads; when it completes, its
    future notifies the loop with ``call_soon_threadsafe``, which on a closed loop raises "Event loop is closed"
    in that thread (printed as an unraisable exception, seen in CI after a fallback). An open, idle loop takes
    the late callback silently. The failed loops are kept (a few file descriptors each, failures only); the
    oldest is closed once ``_KEEP`` newer ones exist, long after its reads ended."""
    with _lock:
        _kept.append(loop)
        while len(_kept) > _KEEP:
            _kept.pop(0).close()


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        # return_exceptions: each task's error (orbax re-raises the cancellation as Exception) is retrieved here
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


@contextlib.contextmanager
def draining_orbax_loops() -> Iterator[None]:
    """Within the block (nestable, any thread), orbax runs its coroutines with :func:`run_draining`.

    An orbax without ``asyncio_utils._run_sync_via_new_loop`` is left as it is (restores still work; only
    the tracebacks come back): tests/test_checkpoint.py checks that the function is there to replace."""
    global _depth
    if _ORIGINAL is None:
        yield
        return
    with _lock:
        _depth += 1
        asyncio_utils._run_sync_via_new_loop = run_draining
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                asyncio_utils._run_sync_via_new_loop = _ORIGINAL
