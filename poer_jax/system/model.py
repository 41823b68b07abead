"""The model from the config: its shapes alone (``model_shapes``: what the plan compiles for, and the checks
before any loading) or its weights on the mesh (``load_model``: what a run trains)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from poer_jax.model import QwenConfig, init_params, load_hf, preset
from poer_jax.model.presets import preset_names
from poer_jax.model.sharding import param_shardings
from poer_jax.system.config import ConfigError


def model_shapes(cfg: ml_collections.ConfigDict) -> tuple[QwenConfig, str]:
    """The model's shapes without its weights: ``model.path``'s config.json, ``model.preset``, or the preset
    whose name the missing ``model.path`` ends with (e.g. DeepSeek-R1-Distill-Qwen-7B). Numerics from
    ``model.param_dtype`` / ``dtype`` / ``remat`` / ``attention``."""
    m = cfg.model
    numerics = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention)
    if m.path is not None and (Path(m.path) / "config.json").is_file():
        return QwenConfig.from_pretrained(m.path, **numerics), f"shapes from {m.path}/config.json"
    if m.preset is not None:
        return preset(m.preset, **numerics), f"shapes of preset {m.preset}"
    name = Path(str(m.path)).name.lower()
    for p in sorted(preset_names(), key=len, reverse=True):
        if re.search(rf"(^|[-_/]){re.escape(p)}$", name):
            return preset(p, **numerics), f"model.path {m.path} is not here: shapes of preset {p}"
    raise ConfigError(f"config key 'model.path': {m.path} has no config.json and matches no preset "
                      f"({', '.join(preset_names())}); pass --config.model.preset=NAME --config.model.path=None")


def load_model(cfg: ml_collections.ConfigDict, mesh: Mesh, *, frozen: bool = False) -> tuple[Any, QwenConfig]:
    """Parameters on the mesh, from ``model.path`` (HF directory) or ``model.preset`` (random weights).

    ``frozen``: the weights a LoRA update keeps frozen, read straight into the compute dtype ``model.dtype`` (no
    float32 copy on the way); the returned config keeps ``model.param_dtype``, the adapters' and their moments'."""
    dtypes = dict(param_dtype=cfg.model.dtype if frozen else cfg.model.param_dtype, dtype=cfg.model.dtype,
                  remat=cfg.model.remat, attention=cfg.model.attention)
    if cfg.model.path is not None:
        params, mcfg = load_hf(cfg.model.path, mesh=mesh, **dtypes)
    else:
        mcfg = preset(cfg.model.preset, **dtypes)
        # created in place on the mesh: no process holds the whole model, none builds it on one device first
        init = jax.jit(lambda k: init_params(mcfg, k), out_shardings=param_shardings(mcfg, mesh))
        params = init(jax.random.key(cfg.seed))
    return params, mcfg.replace(param_dtype=cfg.model.param_dtype)
