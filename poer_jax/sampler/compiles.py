"""Count and time XLA compilations (jax.monitoring events), for the no-recompile tests and the benchmarks.

    with CompileLog() as log:
        sampler.generate(...)
    log.count("_prefill_insert"), log.seconds()

Every jit cache miss that reaches the backend records a '/jax/core/compile/backend_compile_duration' event
named after the function; tracing and lowering record their own durations. A program served from the
in-memory cache records nothing, so ``count()`` is the number of programs compiled inside the block.
"""

from __future__ import annotations

import collections
from types import TracebackType
from typing import Any

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class CompileLog:
    """Compilations (per function name) and compile-related seconds recorded while the block runs."""

    def __init__(self) -> None:
        self.compiles: collections.Counter[str] = collections.Counter()
        self.durations: collections.Counter[str] = collections.Counter()

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in (BACKEND_COMPILE, TRACE, LOWER):
            self.durations[event] += duration
        if event == BACKEND_COMPILE:
            self.compiles[str(kwargs.get("fun_name", "?"))] += 1

    def __enter__(self) -> CompileLog:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

    def count(self, name_contains: str = "") -> int:
        """Programs compiled whose function name contains ``name_contains`` (all by default)."""
        return sum(n for name, n in self.compiles.items() if name_contains in name)

    def seconds(self) -> float:
        """Tracing + lowering + backend compilation time."""
        return float(sum(self.durations.values()))
