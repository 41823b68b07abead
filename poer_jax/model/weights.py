"""Hugging Face checkpoint I/O through one declarative name table.

Loading: every parameter is built with ``jax.make_array_from_callback`` against its target sharding;
the callback reads only the slice a device needs from the memory-mapped safetensors file, so the model
is never materialised twice in host memory. Export: parameters are fetched one at a time and streamed
into safetensors shards that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from poer_jax.model.config import QwenConfig
from poer_jax.model.qwen import Params, param_shapes
from poer_jax.model.safetensors_io import SafetensorsCheckpoint, WeightFileError, write_safetensors
from poer_jax.model.sharding import flat_param_names, param_shardings, single_device_mesh, unflatten_param_names

# flax name -> (HF name, transform). "{i}" is the layer index; "T" = HF stores [out, in], we store [in, out].
WEIGHT_TABLE: dict[str, tuple[str, str]] = {
    "embed": ("model.embed_tokens.weight", "id"),
    "final_norm": ("model.norm.weight", "id"),
    "lm_head": ("lm_head.weight", "T"),
    "layers/input_norm": ("model.layers.{i}.input_layernorm.weight", "id"),
    "layers/post_norm": ("model.layers.{i}.post_attention_layernorm.weight", "id"),
    "layers/q_proj": ("model.layers.{i}.self_attn.q_proj.weight", "T"),
    "layers/k_proj": ("model.layers.{i}.self_attn.k_proj.weight", "T"),
    "layers/v_proj": ("model.layers.{i}.self_attn.v_proj.weight", "T"),
    "layers/o_proj": ("model.layers.{i}.self_attn.o_proj.weight", "T"),
    "layers/q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "id"),
    "layers/k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "id"),
    "layers/v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "id"),
    "layers/q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "id"),
    "layers/k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "id"),
    "layers/gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", "T"),
    "layers/up_proj": ("model.layers.{i}.mlp.up_proj.weight", "T"),
    "layers/down_proj": ("model.layers.{i}.mlp.down_proj.weight", "T"),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json", "added_tokens.json")


def _to_ours(x: np.ndarray, transform: str) -> np.ndarray:
    return x.T if transform == "T" else x


def _check_shape(ckpt: SafetensorsCheckpoint, hf_name: str, expected_hf_shape: tuple[int, ...]) -> None:
    got = ckpt.get(hf_name).shape
    if tuple(got) != tuple(expected_hf_shape):
        raise WeightFileError(
            f"{ckpt.file_of(hf_name)}: tensor {hf_name!r} has shape {tuple(got)}, "
            f"config.json implies {tuple(expected_hf_shape)}")


def _hf_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transform == "T" else shape


def check_hf_dir(model_dir: str | Path, cfg: QwenConfig | None = None, **cfg_overrides: Any
                 ) -> tuple[QwenConfig, SafetensorsCheckpoint]:
    """Check a local HF directory without reading any tensor data: config.json (model_type, architectures,
    shapes), every weight file's header and size (a truncated file is named), and that every tensor the
    config implies is present with its shape. Errors name the file (and the tensor)."""
    cfg = cfg or QwenConfig.from_pretrained(model_dir, **cfg_overrides)
    ckpt = SafetensorsCheckpoint(model_dir)
    ckpt.files()
    for name, shape in flat_param_names(param_shapes(cfg)).items():
        hf_name, tr = WEIGHT_TABLE[name]
        per_layer = shape[1:] if name.startswith("layers/") else shape
        names = [hf_name.format(i=i) for i in range(cfg.num_layers)] if "{i}" in hf_name else [hf_name]
        for n in names:
            _check_shape(ckpt, n, _hf_shape(per_layer, tr))
    return cfg, ckpt


@jax.jit
def _finite_per_row(leaves: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per parameter: all-finite per layer for stacked [L, ...] parameters, else one flag."""
    return {k: jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) if k.startswith("layers/")
            else jnp.all(jnp.isfinite(x)) for k, x in leaves.items()}


def nonfinite_tensors(flat: dict[str, jax.Array], cfg: QwenConfig) -> list[str]:
    """HF names of the loaded tensors holding NaN or inf (one fused reduction per parameter)."""
    flags = jax.device_get(_finite_per_row(flat))
    bad = []
    for name, ok in flags.items():
        hf_name = WEIGHT_TABLE[name][0]
        ok = np.atleast_1d(np.asarray(ok))
        bad += [hf_name.format(i=i) for i in np.flatnonzero(~ok)]
    return bad


def load_hf(
    model_dir: str | Path, cfg: QwenConfig | None = None, mesh: Mesh | None = None, *, check_finite: bool = True,
    **cfg_overrides: Any,
) -> tuple[Params, QwenConfig]:
    """Load a local HF Qwen2/Qwen3 directory into a parameter tree sharded over ``mesh``.

    Returns (params, cfg). Tensor names, shapes and presence are checked against the table before any
    device memory is allocated; errors name the file and the tensor. ``check_finite`` then checks the
    loaded weights on device and names the tensors (and files) holding NaN or inf.
    """
    cfg, ckpt = check_hf_dir(model_dir, cfg, **cfg_overrides)
    mesh = mesh or single_device_mesh()
    shapes = flat_param_names(param_shapes(cfg))
    shardings = flat_param_names(param_shardings(cfg, mesh))
    dtype = np.dtype(cfg.jnp_param_dtype)

    flat: dict[str, jax.Array] = {}
    for name, shape in shapes.items():
        hf_name, tr = WEIGHT_TABLE[name]
        stacked = "{i}" in hf_name

        def read(index: tuple[slice, ...], hf_name: str = hf_name, tr: str = tr, stacked: bool = stacked,
                 shape: tuple[int, ...] = shape) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if not stacked:
                return np.asarray(_to_ours(ckpt.get(hf_name), tr)[index], dtype=dtype)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([np.asarray(_to_ours(ckpt.get(hf_name.format(i=i)), tr)[index[1:]], dtype=dtype)
                             for i in layers])

        flat[name] = jax.make_array_from_callback(shape, shardings[name], read)
    if check_finite:
        bad = nonfinite_tensors(flat, cfg)
        if bad:
            shown = ", ".join(f"{n!r} ({ckpt.file_of(n)})" for n in bad[:4])
            raise WeightFileError(f"{model_dir}: non-finite weights (NaN or inf) in {shown}"
                                  + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return unflatten_param_names(flat), cfg


def _gather_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_hf(
    params: Params,
    cfg: QwenConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """Write ``params`` as an HF directory (config.json, safetensors shards + index, tokenizer files).

    ``dtype`` (e.g. 'bfloat16') casts on the way out; default keeps the parameter dtype.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = flat_param_names(params)
    out_dtype = np.dtype(QwenConfig.replace(cfg, param_dtype=dtype).jnp_param_dtype) if dtype else None

    # (flax name, layer or None, HF name, HF shape, dtype) in write order, then split into shards.
    entries: list[tuple[str, int | None, str, tuple[int, ...], np.dtype]] = []
    for name, arr in flat.items():
        hf_name, tr = WEIGHT_TABLE[name]
        dt = out_dtype or np.dtype(arr.dtype)
        if "{i}" in hf_name:
            for i in range(arr.shape[0]):
                entries.append((name, i, hf_name.format(i=i), _hf_shape(tuple(arr.shape[1:]), tr), dt))
        else:
            entries.append((name, None, hf_name, _hf_shape(tuple(arr.shape), tr), dt))
    shards: list[list[Any]] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(e[3], dtype=np.int64)) * e[4].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes

    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

        def produce(shard: list[Any] = shard) -> Iterator[tuple[str, np.ndarray]]:
            host_name, host = None, None
            for name, layer, hf_name, _, dt in shard:
                if name != host_name:  # one parameter on the host at a time
                    host_name, host = name, _gather_host(flat[name])
                x = host if layer is None else host[layer]
                yield hf_name, np.ascontiguousarray(_to_ours(x, WEIGHT_TABLE[name][1])).astype(dt, copy=False)

        if jax.process_index() == 0:
            write_safetensors(out / fname, [(e[2], e[3], e[4]) for e in shard], produce)
        else:
            for _ in produce():
                pass
        weight_map.update({e[2]: fname for e in shard})

    if jax.process_index() == 0:
        if len(shards) > 1:
            total = sum(int(np.prod(e[3], dtype=np.int64)) * e[4].itemsize for e in entries)
            (out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf_cfg = QwenConfig.replace(cfg, param_dtype=dtype or cfg.param_dtype).to_hf_dict()
        if tokenizer_dir is not None:
            src = Path(tokenizer_dir)
            for f in TOKENIZER_FILES:
                if (src / f).is_file() and (src / f).resolve() != (out / f).resolve():
                    shutil.copy2(src / f, out / f)
            src_cfg = src / "config.json"
            if src_cfg.is_file():  # keep token ids and other keys the runtime needs
                old = json.loads(src_cfg.read_text())
                for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                    if k in old:
                        hf_cfg[k] = old[k]
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return out

