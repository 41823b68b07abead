"""The JAX runtime of a process: which backend it starts (``skip_absent_tpu``) and where compiled programs are
cached between processes (``enable_compilation_cache``)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections


def skip_absent_tpu() -> bool:
    """With libtpu installed (the ``tpu`` and ``test`` extras) on a host without TPU chips and without a GPU
    plugin, JAX would try to start the TPU runtime first (seconds, and a page of libtpu errors on stderr):
    use the CPU backend instead. Does nothing when ``JAX_PLATFORMS`` is set. Call before JAX's first device use;
    returns whether it switched."""
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
        return False
    if any(importlib.util.find_spec(f"jax_{p}_plugin") for p in ("cuda12", "cuda13", "rocm7", "rocm")):
        return False
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def enable_compilation_cache(cfg: ml_collections.ConfigDict) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``train.compilation_cache_dir`` (default: the
    ``JAX_COMPILATION_CACHE_DIR`` environment variable when set, else ``workdir/jax_cache``; '' = off): a
    restarted or resumed run loads its compiled programs instead of compiling them again (minutes each at
    7B scale). Returns the directory."""
    d = cfg.train.compilation_cache_dir
    if d == "":
        return None
    if d is None:
        d = os.environ.get("JAX_COMPILATION_CACHE_DIR") or Path(cfg.workdir) / "jax_cache"
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(path):
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # a cache already opened in this process keeps its directory otherwise
        jax.config.update("jax_compilation_cache_dir", str(path))
    return path
