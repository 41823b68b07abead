"""Compile a ``ProgramSpec`` for a target and read the compiled program's per-device memory and cost.

TPU and GPU targets compile for the real chip on any host through ``jax.experimental.topologies`` (TPU:
libtpu, the ``tpu`` extra; GPU: JAX's CUDA plugin, ``plan/gpu.py``): the devices of a slice exist without the
hardware, and ``jit(...).lower(...).compile()`` runs the target's own compiler. ``cpu-N`` targets compile for N
host CPU devices (set ``--xla_force_host_platform_device_count`` before JAX starts; ``scripts/plan.py`` does).
Lowering runs under ``jax.set_mesh`` so that mesh-aware code (splash attention's ``shard_map``, Mosaic's device
kind, the attention and KV-layout choices) sees the target's devices. Costs per call: ``plan/costs.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
from jax.sharding import Mesh

from poer_jax.plan.costs import CallCost, call_cost
from poer_jax.plan.targets import Target
from poer_jax.program_spec import ProgramSpec


class PlanError(RuntimeError):
    """The plan cannot run (missing libtpu, too few host devices, a bad target); the message says what to do."""


def target_devices(target: Target) -> list[Any]:
    """The devices of ``target``: a TPU or GPU topology's (abstract) devices, or host CPU devices."""
    if target.platform == "gpu":
        from poer_jax.plan.gpu import GpuPlanError, gpu_devices

        try:
            return gpu_devices(target)
        except GpuPlanError as e:
            raise PlanError(str(e)) from None
    if target.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise PlanError(f"target {target.name} compiles for TPU through libtpu, which is not installed: "
                            'pip install -e ".[tpu]" (or ".[test]")') from None
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes on one host
        from jax.experimental import topologies

        kwargs: dict[str, Any] = {"chips_per_host_bounds": (1, 1, 1)} if target.single_chip else {}
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs)
        devices = list(topo.devices)
    else:
        devices = [d for d in jax.devices() if d.platform == "cpu"]
    if len(devices) < target.num_devices:
        raise PlanError(
            f"target {target.name} needs {target.num_devices} devices, this process has {len(devices)} host CPU "
            f"devices: start Python with XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} "
            "(scripts/plan.py sets it)")
    return devices[: target.num_devices]


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    """Per-device numbers of one compiled program: memory from ``memory_analysis()``; FLOPs and bytes accessed
    per call from ``plan/costs.py`` (loop bodies times their trip counts, custom-call kernels by formula)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    bytes_accessed: float
    compile_seconds: float
    error: str | None = None  # the compiler refused the program (TPU: out of HBM); sizes then are its estimate
    calls: CallCost | None = None  # how flops / bytes_accessed were counted (loops, kernels)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "calls"}
        if self.calls is not None:
            out["cost_per_call"] = self.calls.to_json()
        return out


_SIZE = re.compile(r"\(([0-9.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(e: Exception, seconds: float) -> CompiledCost | None:
    """A TPU compile that fails for lack of HBM is a verdict, not an error: keep the compiler's message and the
    temporaries it asked for (``... HLO temporaries (61.04G) exceeds available HBM (15.75G)``)."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    sizes = [float(v) * _UNITS[u] for v, u in _SIZE.findall(text)]
    line = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])
    return CompiledCost(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=int(sizes[0]) if sizes else 0,
                        flops=0.0, bytes_accessed=0.0, compile_seconds=seconds, error=line.strip()[:500])


def compile_program(spec: ProgramSpec, mesh: Mesh) -> CompiledCost:
    """Lower and compile ``spec`` under ``jax.set_mesh(mesh)``; nothing is allocated or run."""
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = spec.fn.lower(*spec.args, **spec.kwargs).compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError has no stable import path)
        oom = _out_of_memory(e, time.perf_counter() - t0)
        if oom is None:
            raise
        return oom
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    calls = call_cost(compiled.as_text())
    return CompiledCost(
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        flops=calls.flops, bytes_accessed=calls.bytes_accessed, compile_seconds=seconds, calls=calls)


def spec_arg(spec: ProgramSpec, where: int | str) -> Any:
    """The argument of ``spec`` at a position (int) or keyword (str)."""
    if isinstance(where, int):
        if not 0 <= where < len(spec.args):
            raise PlanError(f"program {spec.name}: resident argument position {where} is out of range")
        return spec.args[where]
    if where not in spec.kwargs:
        raise PlanError(f"program {spec.name}: resident argument {where!r} is not one of its keywords")
    return spec.kwargs[where]
