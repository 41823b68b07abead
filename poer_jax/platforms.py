"""Which JAX platforms a command starts when ``JAX_PLATFORMS`` is unset: the installed ones whose hardware is here.

The ``test`` extra installs libtpu (TPU-topology plans) and JAX's CUDA plugin (GPU-topology plans) on every
machine. Left to itself, JAX initialises every installed platform when it first needs a device: without an NVIDIA
GPU the CUDA plugin fails its CUDA checks (a traceback on stderr), without TPU chips libtpu spends seconds and a
page of errors. The entry points (``python -m poer_jax.train``, ``python -m poer_jax.evaluate`` and the scripts
that build a sampler or a trainer: ``scripts/accelerator_check.py``, ``bench_rollout.py``, ``bench_sampler.py``,
``check_parity.py``, ``sweep_poer.py``, ``warm_start.py``) call ``use_present_platforms()`` before JAX starts a
backend: an installed
platform is kept when its hardware is visible (NVIDIA: a ``/dev/nvidia*`` device node; AMD: ``/dev/kfd``; TPU:
libtpu's chip count), and the CPU always. Nothing changes when ``JAX_PLATFORMS`` (or ``jax_platforms``) is set,
or when every installed platform has its hardware.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax

# platform -> (plugin modules, any of which means it is installed)
_PLUGINS = {"cuda": ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_cuda12_plugin", "jax_cuda13_plugin"),
            "rocm": ("jax_plugins.xla_rocm7", "jax_plugins.xla_rocm60", "jax_rocm7_plugin", "jax_rocm60_plugin"),
            "tpu": ("libtpu",)}


def _installed(platform: str) -> bool:
    for name in _PLUGINS[platform]:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # the parent package (jax_plugins) is absent
            continue
    return False


def _hardware(platform: str) -> bool:
    if platform == "cuda":
        return os.path.exists("/dev/nvidiactl") or bool(glob.glob("/dev/nvidia[0-9]*"))
    if platform == "rocm":
        return os.path.exists("/dev/kfd")
    from jax._src import hardware_utils

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def present_platforms(installed: dict[str, bool] | None = None, hardware: dict[str, bool] | None = None) -> str | None:
    """The ``jax_platforms`` value for this host ('cuda,cpu', 'tpu,cpu', 'cpu', ...), or None when every
    installed platform has its hardware (JAX's own choice is right). ``installed`` / ``hardware``: per platform,
    instead of looking (tests)."""
    have = {p: (installed[p] if installed is not None else _installed(p)) for p in _PLUGINS}
    absent = [p for p in _PLUGINS if have[p] and not (hardware[p] if hardware is not None else _hardware(p))]
    if not absent:
        return None
    return ",".join([p for p in _PLUGINS if have[p] and p not in absent] + ["cpu"])


def use_present_platforms() -> str | None:
    """Set ``jax_platforms`` to ``present_platforms()`` unless the user chose (``JAX_PLATFORMS`` or the config
    option). Call before JAX's first device use; returns what it set, or None."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return None
    chosen = present_platforms()
    if chosen is not None:
        jax.config.update("jax_platforms", chosen)
    return chosen
