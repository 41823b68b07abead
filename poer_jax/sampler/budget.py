"""KV pool size from a memory budget: pages per device, not batch x maximum length.

A page holds ``page_size`` tokens of K and V for every layer and KV head, so its bytes on one device are

    bytes_per_page = 2 * L * Hkv * page_size * hd * itemsize(kv_dtype) / head_shards

(``head_shards`` = the ways the KV heads are split over the ``tensor`` axis, 1 when they are replicated).
A budget of B bytes per device gives floor(B / bytes_per_page) pages to each device of the batch axes; the
group sampler refills decode slots as samples finish (batch_sampler.py), so a pool smaller than a whole
step still serves it, only in more rounds.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from poer_jax.model.config import QwenConfig, dtype_from_name
from poer_jax.sampler.pages import SamplerError

GB = 1e9


def kv_bytes_per_page(cfg: QwenConfig, page_size: int, kv_dtype: Any, head_shards: int = 1) -> int:
    """Bytes of one page (K and V, all layers) on one device; see the module docstring."""
    itemsize = np.dtype(dtype_from_name(kv_dtype)).itemsize
    heads = cfg.num_kv_heads // head_shards if cfg.num_kv_heads % head_shards == 0 else cfg.num_kv_heads
    return 2 * cfg.num_layers * heads * page_size * cfg.head_dim * itemsize


def pages_for_bytes(budget_bytes: float, cfg: QwenConfig, page_size: int, kv_dtype: Any, head_shards: int = 1) -> int:
    """Pages per device that fit ``budget_bytes`` (at least one page is required)."""
    per_page = kv_bytes_per_page(cfg, page_size, kv_dtype, head_shards)
    pages = int(budget_bytes // per_page)
    if pages < 1:
        raise SamplerError(
            f"KV budget {budget_bytes / GB:.3g} GB per device holds no page of {per_page / GB:.3g} GB "
            f"(page_size {page_size} x {cfg.num_layers} layers x K and V)")
    return pages


def device_free_bytes(device: Any | None = None) -> int | None:
    """Free memory of ``device`` (default: the first local device) as its backend reports it: bytes_limit -
    bytes_in_use from ``memory_stats()`` (GPU, TPU); None where the backend reports nothing (CPU)."""
    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without the call raise instead of returning None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def budget_bytes(gb: float | None, fraction: float | None, devices: Any = None) -> float | None:
    """The per-device KV budget: ``fraction`` x the smallest free memory over ``devices`` when given (it
    needs a backend that reports memory), else ``gb`` GB; None when neither is set."""
    if fraction is not None:
        devices = list(devices) if devices is not None else jax.local_devices()
        free = [device_free_bytes(d) for d in devices]
        if any(f is None for f in free):
            raise SamplerError(
                f"a KV budget as a fraction of free memory needs a backend that reports device memory; "
                f"{devices[0].platform} does not: give the budget in GB instead")
        return float(fraction) * min(f for f in free if f is not None)
    return None if gb is None else float(gb) * GB
