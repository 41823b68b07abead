"""LoRA adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable by
``peft.PeftModel.from_pretrained(<the HF base model>, directory)``.

Tensor names are PEFT's for a causal LM: the base model's module path (``WEIGHT_TABLE``) under
``base_model.model.``, then ``lora_A.weight`` [r, in] / ``lora_B.weight`` [out, r] (torch's [out, in] layout:
our A [in, r] and B [r, out] transposed), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``.
PEFT computes x W^T + (lora_alpha / r) B(A(dropout(x))), the same function (``lora.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from poer_jax.model.adapters import adapter_shapes
from poer_jax.model.config import QwenConfig
from poer_jax.model.lora import LORA_TARGETS, LoraConfig
from poer_jax.model.safetensors_io import SafetensorsFile, WeightFileError, write_safetensors
from poer_jax.model.weights import WEIGHT_TABLE

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_module(product: str, layer: int) -> str:
    """PEFT's module path of one adapted product, e.g. ``base_model.model.model.layers.3.mlp.up_proj``."""
    return PEFT_PREFIX + WEIGHT_TABLE[f"layers/{product}"][0].format(i=layer).removesuffix(".weight")


def peft_config(lora: LoraConfig, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json: plain LoRA (no rsLoRA, DoRA or bias), PEFT's scaling lora_alpha / r."""
    alpha = float(lora.alpha)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": int(lora.rank), "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "lora_dropout": float(lora.dropout), "target_modules": list(lora.products), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def export_peft(adapters: dict[str, Any], lora: LoraConfig, out_dir: str | Path,
                base_model: str | None = None) -> Path:
    """Write host ``adapters`` (``model.adapters`` tree, numpy) as a PEFT adapter directory, in their dtype."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[str, np.ndarray]] = []
    for product in lora.products:
        a, b = (np.asarray(adapters["layers"][product][k]) for k in ("a", "b"))
        for i in range(a.shape[0]):
            module = peft_module(product, i)
            entries += [(f"{module}.lora_A.weight", a[i].T), (f"{module}.lora_B.weight", b[i].T)]
    write_safetensors(out / WEIGHTS_FILE, [(n, x.shape, x.dtype) for n, x in entries], lambda: iter(entries))
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(lora, base_model), indent=2) + "\n")
    return out


def load_peft(directory: str | Path, cfg: QwenConfig) -> tuple[dict[str, Any], LoraConfig]:
    """(adapters as numpy, LoraConfig) from a PEFT LoRA directory for the model ``cfg``; errors name the file
    and the key or tensor."""
    d = Path(directory)
    path = d / CONFIG_FILE
    try:
        pc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightFileError(f"{path}: unreadable ({e})") from e
    if pc.get("peft_type") != "LORA" or pc.get("use_rslora") or pc.get("use_dora") or pc.get("fan_in_fan_out"):
        raise WeightFileError(f"{path}: not a plain LoRA adapter (peft_type LORA without rsLoRA, DoRA or "
                              "fan_in_fan_out)")
    if pc.get("rank_pattern") or pc.get("alpha_pattern") or pc.get("layers_to_transform") is not None:
        raise WeightFileError(f"{path}: per-module ranks, alphas or layer subsets are not supported")
    modules = pc.get("target_modules")
    by_product = {p: t for t, p in LORA_TARGETS.items()}
    if not isinstance(modules, list) or any(m not in by_product for m in modules):
        raise WeightFileError(f"{path}: 'target_modules' must list products among {list(by_product)}, got {modules}")
    lora = LoraConfig(rank=int(pc["r"]), alpha=float(pc["lora_alpha"]), dropout=float(pc.get("lora_dropout", 0)),
                      targets=tuple(t for t in LORA_TARGETS if LORA_TARGETS[t] in modules))
    f = SafetensorsFile(d / WEIGHTS_FILE)
    layers = {}
    for product in lora.products:
        a, b = [], []
        for i in range(cfg.num_layers):
            module = peft_module(product, i)
            for name, out in ((f"{module}.lora_A.weight", a), (f"{module}.lora_B.weight", b)):
                if name not in f.keys():
                    raise WeightFileError(f"{d / WEIGHTS_FILE}: missing tensor {name!r}")
                out.append(np.asarray(f.get(name)).T)
        layers[product] = {"a": np.stack(a), "b": np.stack(b)}
        for k, want in adapter_shapes(cfg, lora)["layers"][product].items():
            if layers[product][k].shape != want:
                raise WeightFileError(f"{d / WEIGHTS_FILE}: the {product} adapters' {k.upper()} stack to shape "
                                      f"{layers[product][k].shape}, the model and r={lora.rank} imply {want}")
    return {"layers": layers}, lora
