"""Accelerator targets: per-chip memory, bandwidth and peak FLOP/s, and how to get their devices on this host.

One table serves the plan command (does a config's program fit, what is its roofline time) and the step-time
projections (what would a POER / GRPO step cost on real hardware). Figures are public specs, bf16 dense peak.

TPU targets compile for the real chip on any host (``jax.experimental.topologies`` + libtpu, the ``tpu``
extra): the compiled program's ``memory_analysis()`` is the TPU's own. GPU targets compile for the real card the
same way, through JAX's CUDA plugin (``plan/gpu.py``): XLA:GPU's sm_90 programs and buffer assignment. A GPU
target of N nodes is named ``Nx <target>`` (e.g. ``2x h100-80gb-8``: two 8-GPU hosts). ``cpu-N`` targets are N
host CPU devices.
"""

from __future__ import annotations

import dataclasses
import re

GB = 1e9
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: memory bytes, memory bandwidth (bytes/s), peak bf16 FLOP/s."""

    name: str
    memory_bytes: float
    bandwidth: float
    peak_flops: float


CHIPS: dict[str, Chip] = {
    "tpu-v4": Chip("TPU v4", 32 * GIB, 1.2e12, 275e12),
    "tpu-v5e": Chip("TPU v5e", 16 * GIB, 0.82e12, 197e12),
    "tpu-v5p": Chip("TPU v5p", 95 * GIB, 2.76e12, 459e12),
    "tpu-v6e": Chip("TPU v6e", 32 * GIB, 1.64e12, 918e12),
    "h100-80gb": Chip("H100 SXM 80GB", 80 * GB, 3.35e12, 989e12),
    "h200-141gb": Chip("H200 141GB", 141 * GB, 4.8e12, 989e12),
    # a 2-core host of this project's CI class: ~45 GFLOP/s, ~8 GB/s (measured), memory per device = host RAM
    "cpu": Chip("host CPU", 24 * GIB, 8e9, 45e9),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A named slice: ``num_devices`` devices of ``chip``. ``topology``: the name for
    ``topologies.get_topology_desc`` (TPU: e.g. 'v5p:2x2x2'; GPU: slices x hosts x GPUs per host, e.g. '1x1x8');
    ``single_chip``: needs chips_per_host_bounds=(1, 1, 1)."""

    name: str
    chip: Chip
    num_devices: int
    platform: str  # "tpu" | "gpu" | "cpu"
    topology: str | None = None
    single_chip: bool = False


def _tpu(name: str, chip: str, topology: str, devices: int, single: bool = False) -> Target:
    return Target(name, CHIPS[chip], devices, "tpu", topology, single)


def _gpu(name: str, chip: str, devices: int) -> Target:
    return Target(name, CHIPS[chip], devices, "gpu", f"1x1x{devices}")  # one host of ``devices`` GPUs


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _tpu("tpu-v4-8", "tpu-v4", "v4:2x2x1", 8),  # v4 exposes two devices per chip (megacore off)
        _tpu("tpu-v5e-1", "tpu-v5e", "v5e:1x1", 1, single=True),
        _tpu("tpu-v5e-4", "tpu-v5e", "v5e:2x2", 4),
        _tpu("tpu-v5e-8", "tpu-v5e", "v5e:2x4", 8),
        _tpu("tpu-v5e-16", "tpu-v5e", "v5e:4x4", 16),
        _tpu("tpu-v5p-1", "tpu-v5p", "v5p:1x1x1", 1, single=True),
        _tpu("tpu-v5p-4", "tpu-v5p", "v5p:2x2x1", 4),
        _tpu("tpu-v5p-8", "tpu-v5p", "v5p:2x2x2", 8),
        _tpu("tpu-v5p-64", "tpu-v5p", "v5p:4x4x4", 64),
        _tpu("tpu-v6e-1", "tpu-v6e", "v6e:1x1", 1, single=True),
        _tpu("tpu-v6e-8", "tpu-v6e", "v6e:2x4", 8),
        _gpu("h100-80gb-1", "h100-80gb", 1),
        _gpu("h100-80gb-8", "h100-80gb", 8),
        _gpu("h200-141gb-1", "h200-141gb", 1),
        _gpu("h200-141gb-8", "h200-141gb", 8),
    )
}
_NODES = re.compile(r"^([1-9][0-9]*)\s*x\s*(\S+)$")


def get_target(name: str) -> Target:
    """A target by name; ``cpu-N`` for N host CPU devices; ``Nx <gpu target>`` for N such GPU hosts. Unknown
    names list the known ones."""
    name = name.strip()
    if name.startswith("cpu-") and name[4:].isdigit() and int(name[4:]) > 0:
        return Target(name, CHIPS["cpu"], int(name[4:]), "cpu")
    nodes = _NODES.match(name)
    if nodes and nodes.group(2) in TARGETS and TARGETS[nodes.group(2)].platform == "gpu":
        host = TARGETS[nodes.group(2)]
        n = int(nodes.group(1))
        return Target(f"{n}x {host.name}", host.chip, n * host.num_devices, "gpu", f"{n}x1x{host.num_devices}")
    if name not in TARGETS:
        known = ", ".join(sorted(TARGETS)) + ", cpu-N, Nx <gpu target> (N hosts, e.g. 2x h100-80gb-8)"
        raise KeyError(f"unknown target {name!r}; known targets: {known}")
    return TARGETS[name]


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """Lower bound on a program's time on one chip: max(FLOPs / peak, bytes / bandwidth)."""
    return max(flops / chip.peak_flops, bytes_accessed / chip.bandwidth)
