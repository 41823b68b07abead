"""The JAX runtime of a process: where compiled programs are cached between processes
(``enable_compilation_cache``). Which backends a command starts: ``poer_jax.platforms``."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections


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
