"""Configs with the exact shapes of released Qwen-architecture checkpoints, so benchmarks can build
random-weight models of real size without any download. Parameter counts are asserted in the tests."""

from __future__ import annotations

from typing import Any

from poer_jax.model.config import QwenConfig

_PRESETS: dict[str, dict[str, Any]] = {
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B: 1,777,088,000 parameters.
    "r1-distill-qwen-1.5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=131072),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B: 7,615,616,512 parameters.
    "r1-distill-qwen-7b": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=131072),
    # Qwen/Qwen2.5-7B: same shapes as R1-Distill-7B, rope_theta 1e6.
    "qwen2.5-7b": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=131072),
    # Qwen/Qwen3-0.6B: head_dim 128 != 1024 / 16, q/k norms, tied embeddings.
    "qwen3-0.6b": dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        qkv_bias=False, qk_norm=True, model_type="qwen3", max_position_embeddings=40960),
    # A tiny random model for CPU benchmarks and tests.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False),
    # Tiny, with TPU-sized heads (head_dim 128, so splash attention applies): plan and compile tests.
    "tiny-hd128": dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=128, rope_theta=10000.0, tie_word_embeddings=False),
    "tiny-qwen3": dict(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=False,
        qk_norm=True, model_type="qwen3"),
}

PRESET_PARAM_COUNTS = {
    "r1-distill-qwen-1.5b": 1_777_088_000,
    "r1-distill-qwen-7b": 7_615_616_512,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, **overrides: Any) -> QwenConfig:
    """A named preset (see ``preset_names()``); overrides e.g. ``dtype='bfloat16'``."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(preset_names())}")
    return QwenConfig(**{**_PRESETS[name], **overrides})
