"""NVIDIA GPU targets compiled on any host: XLA:GPU's own sm_90 programs, without a GPU, a driver or CUDA.

JAX's CUDA plugin (``jax[cuda12-local]``: the ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` wheels, ~0.2 GB, no
NVIDIA libraries) holds XLA:GPU's compiler. With ``JAX_PLATFORMS=cpu`` set before JAX starts, the plugin stays
registered but opens no GPU, and

    jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=TEXT, topology="SxHxG")

returns the devices of S slices of H hosts with G GPUs each, described by ``TEXT`` (a
``stream_executor.GpuTargetConfigProto`` in text form: compute capability, SM count, shared memory, memory size
and bandwidth, cuDNN and CUDA versions). Their ``platform`` is ``gpu`` and their ``device_kind`` the card's name,
so every choice this project makes from the devices a program is compiled for (attention kernel, KV layout,
attention chunks, layer loop, matmul kernel) is the one a GPU makes; ``jit(...).lower(...).compile()`` runs
XLA:GPU and ``memory_analysis()`` is its buffer assignment. What it is not: autotuned (GEMMs get XLA's default
Triton tiles, fine for memory, not for timing), and cuDNN's workspace shows as 0 bytes.

cuDNN attention (``model.attention`` 'auto' or 'cudnn' on a GPU) also needs cuDNN's library at lowering time
(JAX asks it for its version): ``pip install --no-deps "nvidia-cudnn-cu12>=9.8,<10"`` (~1.1 GB).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax

from poer_jax.plan.targets import Chip, Target


class GpuPlanError(RuntimeError):
    """A GPU target cannot be compiled here; the message says what to install or set."""


# stream_executor.GpuTargetConfigProto fields of each card (text format). The H100 SXM 80GB entry is a real
# card's description (its CUDA-reported memory and bandwidth); the H200 is the same sm_90 part with 141 GB of
# HBM3e at 4.8 TB/s (public specs: memory and bandwidth differ, everything else is the H100's).
_H100_SXM = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152, shared_memory_per_core=233472,
    shared_memory_per_block_optin=232448, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
    block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535, memory_bandwidth=3352320000000,
    l2_cache_size=52428800, clock_rate_ghz=1.98, device_memory_size=84929347584, registers_per_core_limit=65536,
    registers_per_block_limit=65536,
)
GPU_CARDS: dict[str, dict[str, Any]] = {
    "H100 SXM 80GB": dict(info=_H100_SXM, name="NVIDIA H100 80GB HBM3", capability=(9, 0)),
    "H200 141GB": dict(info={**_H100_SXM, "memory_bandwidth": 4800000000000, "device_memory_size": 141 * 10**9},
                       name="NVIDIA H200", capability=(9, 0)),
}
CUDNN_VERSION = (9, 8)  # the cuDNN the programs are compiled for (JAX 0.10's minimum)
CUDA_VERSION = (12, 9)
COMPILER = "XLA:GPU, compiled, not autotuned"


def target_config(chip: Chip) -> str:
    """The ``GpuTargetConfigProto`` text of ``chip`` (module docstring)."""
    if chip.name not in GPU_CARDS:
        raise GpuPlanError(f"no GPU description for chip {chip.name!r}; known: {', '.join(GPU_CARDS)}")
    card = GPU_CARDS[chip.name]
    major, minor = card["capability"]
    fields = " ".join(f"{k}: {v}" for k, v in card["info"].items())
    return (f"gpu_device_info {{ {fields} cuda_compute_capability {{ major: {major} minor: {minor} }} }} "
            f'platform_name: "CUDA" dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }} '
            f"runtime_version {{ major: {CUDA_VERSION[0]} minor: {CUDA_VERSION[1]} }} "
            f'device_description_str: "{card["name"]}"')


def plugin_installed() -> bool:
    """JAX's CUDA plugin (the compiler) is importable."""
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def install_hint() -> str:
    return (f'pip install "jax[cuda12-local]=={jax.__version__}" (JAX\'s CUDA plugin, ~0.2 GB; no GPU, driver or CUDA '
            'toolkit needed), or pip install -e ".[test]"')


def gpu_devices(target: Target) -> list[Any]:
    """The (abstract) devices of a GPU target: ``target.topology`` ('slices x hosts x GPUs per host') of
    ``target.chip``. GpuPlanError names what to install or set when this host cannot compile for it."""
    if not plugin_installed():
        raise GpuPlanError(f"target {target.name} compiles for NVIDIA GPUs through JAX's CUDA plugin, which is not "
                           f"installed: {install_hint()}")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target.chip),
                                            topology=target.topology)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError has no stable import path)
        hint = ("set JAX_PLATFORMS=cpu before JAX starts (scripts/plan.py does): without it the CUDA plugin looks "
                "for a GPU, fails, and cannot describe a topology" if os.environ.get("JAX_PLATFORMS") != "cpu"
                else f"is the plugin's version JAX's ({jax.__version__})? {install_hint()}")
        raise GpuPlanError(f"target {target.name}: the CUDA plugin could not describe topology {target.topology} "
                           f"({str(e).splitlines()[0][:200]}); {hint}") from None
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise GpuPlanError(f"target {target.name}: topology {target.topology} has {len(devices)} devices, "
                           f"expected {target.num_devices}")
    return devices


def cudnn_version() -> int | None:
    """The installed cuDNN's version (e.g. 92800), or None when JAX cannot load it."""
    try:
        from jax._src.lib import cuda_versions

        return None if cuda_versions is None else int(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001  (the library is absent: RuntimeError / OSError from the loader)
        return None


def require_cudnn(target: Target, why: str) -> None:
    """GpuPlanError saying how to install cuDNN (or avoid it) when a program needs it and it is absent."""
    if cudnn_version() is None:
        raise GpuPlanError(
            f"target {target.name}: {why} cuDNN's fused attention, which needs cuDNN to compile: "
            'pip install --no-deps "nvidia-cudnn-cu12>=9.8,<10" (~1.1 GB), or plan the pure-XLA path with '
            "--config.model.attention=chunked")


def gpu_notes(target: Target, mcfg: Any, devices: list[Any]) -> list[str]:
    """The plan's notes for a GPU target (device kind, compiler, attention path, JAX's memory share); raises
    GpuPlanError when the training attention needs cuDNN and it is not installed."""
    from poer_jax.model.attention import resolve_attention

    impl = resolve_attention(mcfg.attention, "gpu", mcfg.jnp_dtype, mcfg.head_dim)
    if impl == "cudnn":
        require_cudnn(target, f"model.attention={mcfg.attention!r} trains with")
    hosts = len({d.process_index for d in devices})
    return [f"{devices[0].device_kind} x {len(devices)} ({hosts} host(s), topology {target.topology}): {COMPILER} "
            "(GEMM tiles are XLA's defaults: right for memory, not for timing; cuDNN's workspace is not counted)",
            f"training attention on the GPU: {impl}",
            "JAX on a GPU preallocates 75 % of its memory by default: run with XLA_PYTHON_CLIENT_MEM_FRACTION set to "
            "the plan's --memory-fraction (0.95 by default) for the verdict to hold"]
