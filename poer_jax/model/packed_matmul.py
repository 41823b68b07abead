"""Pre-packed weight products for CPU decoding (an XLA FFI custom call built on first use).

A decode step multiplies a few rows (a device's slots, B ~ 8) by every weight once, y = x W with x [B, K],
W [K, N]: it streams the weights. XLA:CPU runs each product as an Eigen GEMM that packs W's panels anew at
every call, one more pass over the weights; measured on the h896 shapes at 8 rows, ~30 GFLOP/s, which is
most of a decode step (docs/benchmarks.md). Here W is packed once per weight update into 32-column panels,

    packed[p, k, j] = W[k, 32 p + j]   (N padded with zeros to a multiple of 32),

and ``packed_matmul.cc`` streams each panel once, prefetched, into a register tile of rows x 32 accumulators
(sharing the panels between XLA's intra-op threads when it has more than one).

The kernel is compiled by the host's C++ compiler (``$CXX``, default ``c++``) against the FFI headers that ship
with jaxlib, into ``$POER_JAX_KERNEL_CACHE`` (default ``~/.cache/poer_jax``), keyed by the source, jaxlib, compiler,
flags and CPU. ``kernel_error()`` says why it cannot be used (no compiler, not x86/ARM...); the sampler then keeps
XLA's dot (``SamplerConfig.matmul_kernel``). float32 or bfloat16 operands (bfloat16 widened in registers: half the
bytes streamed), float32 accumulation and results.

Instruction-set paths (``ISA_FLAGS``): the sampler uses ``native`` (``-march=native``: AVX-512 on CPUs that have
it); ``avx2`` and ``baseline`` build the other paths of the same source, so that one machine's tests run every path
a CPU family may take (``isa_paths()``: those this CPU can execute). Within a path a row's result does not depend on
the other rows of the call (the same multiply-add chain over k in every tile shape: ``packed_matmul.cc``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

PANEL = 32  # columns per panel; packed_matmul.cc's kPanel
TARGETS = {jnp.dtype(jnp.float32): "poer_packed_matmul_f32", jnp.dtype(jnp.bfloat16): "poer_packed_matmul_bf16"}
SOURCE = Path(__file__).with_name("packed_matmul.cc")
# the compiler flags of each instruction-set path, per architecture (-ffp-contract=off is added to every one)
ISA_FLAGS = {
    "x86_64": {"native": ("-march=native",), "avx2": ("-march=haswell",), "baseline": ("-march=x86-64",)},
    "aarch64": {"native": ("-march=native",), "baseline": ("-march=armv8-a",)},
}
_NEEDS = {"avx2": ("avx2", "fma")}  # the /proc/cpuinfo flags a path needs beyond the architecture's baseline


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A [K, N] weight packed in 32-column panels: ``data`` [ceil(N / 32), K, 32]; ``n`` the true N."""

    data: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """The unpacked weight's shape [K, N]."""
        return int(self.data.shape[1]), self.n


def pack(w: jax.Array) -> PackedWeight:
    """[K, N] -> packed panels [ceil(N / 32), K, 32] (zero columns past N)."""
    K, N = w.shape
    panels = -(-N // PANEL)
    padded = jnp.pad(w, ((0, 0), (0, panels * PANEL - N)))
    return PackedWeight(padded.reshape(K, panels, PANEL).transpose(1, 0, 2), N)


def unpack(pw: PackedWeight) -> jax.Array:
    """The inverse of ``pack``: [K, N]."""
    P, K, _ = pw.data.shape
    return pw.data.transpose(1, 0, 2).reshape(K, P * PANEL)[:, : pw.n]


def packed_matmul(x: jax.Array, pw: PackedWeight, isa: str = "native") -> jax.Array:
    """x [..., K] times the packed [K, N] weight -> [..., N] float32 (the kernel's ``isa`` path; load it first:
    ``load_kernel(isa)``). Weights float32 or bfloat16, x of the same dtype (handed to the kernel in float32:
    exact); float32 accumulation. No VJP: for sampling, not for training."""
    if x.dtype != pw.data.dtype or x.dtype not in TARGETS:
        raise TypeError(f"packed_matmul takes float32 or bfloat16 operands of one dtype, got {x.dtype} x "
                        f"{pw.data.dtype}")
    K, N = pw.shape
    if x.shape[-1] != K:
        raise ValueError(f"packed_matmul: x [..., {x.shape[-1]}] does not match the weight's K={K}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), K).astype(jnp.float32)
    call = jax.ffi.ffi_call(_target(x.dtype, isa), jax.ShapeDtypeStruct((x2.shape[0], N), jnp.float32))
    return call(x2, pw.data).reshape(*lead, N)


# ---- build and registration -------------------------------------------------------------------------------
_lock = threading.Lock()
_state: dict[str, dict[str, Any]] = {}  # isa -> {"error": "" or why not, "lib": the loaded library}


def _target(dtype: Any, isa: str) -> str:
    """The FFI target name of ``dtype``'s kernel on the ``isa`` path (the native path keeps the bare name)."""
    return TARGETS[jnp.dtype(dtype)] + ("" if isa == "native" else f"_{isa}")


def _arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def isa_paths() -> list[str]:
    """The instruction-set paths this CPU can run (``native`` first); [] on an architecture without a build."""
    flags = set(_cpu_signature().split())
    return [isa for isa in ISA_FLAGS.get(_arch(), {}) if all(f in flags for f in _NEEDS.get(isa, ()))]


def _cache_dir() -> Path:
    env = os.environ.get("POER_JAX_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "poer_jax"


def _cpu_signature() -> str:
    """The CPU's feature flags (``-march=native`` output depends on them), or the machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _flags(isa: str) -> list[str]:
    return [*ISA_FLAGS[_arch()][isa], "-ffp-contract=off"]


def _library_path(cxx: str, isa: str = "native") -> Path:
    """Where the library built from ``SOURCE`` by ``cxx`` for the ``isa`` path, this CPU and jaxlib lives in the
    cache."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.__version__, version, _cpu_signature(),
                                    platform.machine(), *_flags(isa)]).encode()).hexdigest()[:16]
    return _cache_dir() / f"packed_matmul-{isa}-{key}.so"


def _build(cxx: str, isa: str = "native") -> Path:
    include = jax.ffi.include_dir()
    out = _library_path(cxx, isa)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build next to the target and rename: concurrent builders (pytest workers, hosts) never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", *_flags(isa), "-std=c++17", "-shared", "-fPIC", f"-I{include}", str(SOURCE), "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def load_kernel(isa: str = "native") -> None:
    """Build (once per source, compiler, path and CPU) and register the ``isa`` path's kernels with XLA:CPU;
    raises RuntimeError saying why it cannot be (cached: later calls raise the same)."""
    with _lock:
        if isa not in _state:
            _state[isa] = {"error": _load(isa)}
    if _state[isa]["error"]:
        raise RuntimeError(_state[isa]["error"])


def _load(isa: str = "native") -> str:
    arch = _arch()
    if arch not in ISA_FLAGS:
        return f"packed_matmul: no build for the {platform.machine()} architecture"
    if isa not in ISA_FLAGS[arch]:
        return f"packed_matmul: no {isa!r} path on {arch} (paths: {', '.join(ISA_FLAGS[arch])})"
    if isa not in isa_paths():
        return f"packed_matmul: this CPU cannot run the {isa!r} path (it lacks {', '.join(_NEEDS.get(isa, ()))})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"packed_matmul: no C++ compiler ({cxx!r} not on PATH; set CXX)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx, isa)))
        for dtype, symbol in ((jnp.float32, lib.PoerPackedMatmulF32), (jnp.bfloat16, lib.PoerPackedMatmulBF16)):
            jax.ffi.register_ffi_target(_target(dtype, isa), jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        return f"packed_matmul: {e}"
    _state.setdefault(isa, {})["lib"] = lib  # keep the library loaded for the process's life
    return ""


def kernel_error(isa: str = "native") -> str:
    """'' when the ``isa`` path's kernel is built and registered (building it if needed), else why it is not."""
    try:
        load_kernel(isa)
    except RuntimeError as e:
        return str(e)
    return ""
