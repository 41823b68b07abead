"""Tiny random Hugging Face Qwen checkpoints made locally with transformers (torch CPU); no downloads."""

from __future__ import annotations

from pathlib import Path

VOCAB = 97


def make_hf_checkpoint(out: Path, arch: str, tied: bool, seed: int, vocab_size: int = VOCAB,
                       hidden: int = 64, layers: int = 2) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=tied, max_position_embeddings=512, eos_token_id=1, pad_token_id=0,
                  bos_token_id=None)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=10000.0, **common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=24, rope_theta=1000000.0, **common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: perturb so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # logits of a real checkpoint spread over several units; HF's 0.02 init gives near-ties everywhere
        model.get_output_embeddings().weight.mul_(8.0)
    model.eval()
    model.save_pretrained(out)
    return Path(out)
