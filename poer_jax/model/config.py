"""Qwen-architecture configuration, read from a Hugging Face ``config.json`` (transformers 4 or 5).

Covers Qwen2 (q/k/v bias, GQA, RoPE, SwiGLU, RMSNorm, tied or untied embeddings) — which includes the
DeepSeek-R1-Distill-Qwen models — and Qwen3 (per-head q_norm/k_norm, no q/k/v bias, explicit head_dim).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from poer_jax.model.attention import ATTENTION_IMPLEMENTATIONS

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
# the transformers classes whose weights and forward pass each model_type stands for
ARCHITECTURES = {"qwen2": ("Qwen2ForCausalLM",), "qwen3": ("Qwen3ForCausalLM",)}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ModelConfigError(ValueError):
    """A model config that poer_jax cannot run; the message names the file and key."""


def dtype_from_name(name: str | Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or a dtype) -> jnp dtype."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Shapes and numerics of a Qwen2/Qwen3 decoder.

    ``param_dtype`` is the storage dtype of the weights, ``dtype`` the matmul dtype; RMSNorm, softmax and
    RoPE are always computed in float32. Mixed precision = float32 weights (and so float32 Adam moments:
    updates of lr 1e-6 survive) with bfloat16 matmuls. ``attention``: the prefill / training attention
    implementation (``attention.ATTENTION_IMPLEMENTATIONS``; ``auto`` picks by platform).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    model_type: str = "qwen2"
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ModelConfigError(f"QwenConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"QwenConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(f"QwenConfig.model_type={self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.dtype)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ModelConfigError(
                f"QwenConfig.attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")

    @property
    def jnp_dtype(self) -> Any:
        return dtype_from_name(self.dtype)

    @property
    def jnp_param_dtype(self) -> Any:
        return dtype_from_name(self.param_dtype)

    @property
    def q_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> QwenConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **overrides: Any) -> QwenConfig:
        """Build from a transformers config dict; ``source`` names the file in error messages."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"{source}: model_type={model_type!r} (architectures={archs}) is not supported; "
                f"poer_jax runs {', '.join(SUPPORTED_MODEL_TYPES)}")

        if not isinstance(archs, list) or any(a not in ARCHITECTURES[model_type] for a in archs):
            # e.g. a Llama or Mistral checkpoint relabelled qwen2: same tensor names, another model
            raise ModelConfigError(
                f"{source}: model_type={model_type!r} but architectures={archs}; a {model_type} checkpoint is "
                f"{' or '.join(ARCHITECTURES[model_type])}")

        def need(key: str) -> Any:
            if key not in hf:
                raise ModelConfigError(f"{source}: missing key {key!r}")
            return hf[key]

        # transformers 5 moved rope_theta (and rope_scaling) into rope_parameters.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ModelConfigError(f"{source}: rope type {rope_type!r} is not supported (only 'default' RoPE)")
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("use_sliding_window"):
            raise ModelConfigError(f"{source}: use_sliding_window=true is not supported")

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or hidden // num_heads
        is_qwen3 = model_type == "qwen3"
        kwargs: dict[str, Any] = dict(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", False)) if is_qwen3 else True,
            qk_norm=is_qwen3,
            model_type=model_type,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> QwenConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path}: no config.json in model directory {model_dir}")
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{path}: cannot read config: {e}") from e
        return cls.from_hf_dict(hf, source=str(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers (4 and 5) loads for this architecture."""
        arch = "Qwen3ForCausalLM" if self.model_type == "qwen3" else "Qwen2ForCausalLM"
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        return out
