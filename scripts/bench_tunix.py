"""Tunix's sampler (google-tunix, a peer on the same JAX and XLA) on bench_sampler.py's workload: the side of the
peer comparison of issue 12, run in Tunix's own virtual environment (never a dependency of poer_jax).

    python3 -m venv /tmp/tunix && /tmp/tunix/bin/pip install google-tunix "jax[cpu]"
    JAX_PLATFORMS=cpu taskset -c 1 /tmp/tunix/bin/python scripts/bench_tunix.py --threads 1 --json /tmp/tunix.json
    JAX_PLATFORMS=cpu taskset -c 1 python scripts/bench_sampler.py --preset h896 --batch 8 --prompt-len 128 \\
        --new-tokens 128 --threads 1 --json /tmp/ours.json       # interleave the two, repeat; compare in one run

The model: Tunix's Qwen2 (``tunix.models.qwen2.model``) at the shape of bench_sampler's ``h896`` preset by
default (hidden 896, 24 layers, 14 heads / 2 KV, FFN 4864, vocab 32k, untied LM head), fp32, parameters as
Tunix initialises them (the timing does not depend on the values). Prompts: --batch random token prompts of
--prompt-len tokens, left-padded to exactly that length (``max_prompt_length``), greedy, no EOS (an EOS id that
cannot occur), so every row decodes --new-tokens tokens, as bench_sampler's rows do.

Timing, as bench_sampler.py times transformers: one call of 1 new token (the prefill and the first token) and one
of --new-tokens, each the best of --repeats calls after a first (compiling) call; decode step =
(t(N) - t(1)) / (N - 1), decode tok/s = batch x (N - 1) / (t(N) - t(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path


class IdTokenizer:
    """The tokenizer interface Tunix's ``TokenizerAdapter`` accepts (encode, decode, bos_id, eos_id, pad_id) over
    space-separated token ids, so that the prompts are exact token sequences. No BOS is added (``bos_id`` 0 is
    falsy to Tunix), and the EOS id -1 never matches a sampled token."""

    def encode(self, text: str, **_: object) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int], **_: object) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def decode_rates(batch: int, new_tokens: int, one_s: float, full_s: float) -> dict[str, float]:
    """Decode step ms and tok/s from a 1-token call and an N-token call (the first token comes with the prefill)."""
    if new_tokens < 2 or full_s <= one_s:
        raise ValueError(f"decode time is not positive: t(1) = {one_s:.3f} s, t({new_tokens}) = {full_s:.3f} s")
    dec = full_s - one_s
    return {"decode_step_ms": 1e3 * dec / (new_tokens - 1), "decode_tok_s": batch * (new_tokens - 1) / dec}


def time_and_report(call: Callable[[int], float], a: argparse.Namespace, engine: str, header: str) -> dict[str, float]:
    """A peer's timing (module docstring): ``call(n)`` runs one generate call of n new tokens and returns its
    seconds; a first pair of calls warms up, then --repeats pairs, interleaved, best of each. Prints a table
    under ``header`` and writes --json; returns the results."""
    t0 = time.perf_counter()
    call(1), call(a.new_tokens)
    first_s = time.perf_counter() - t0
    ones, fulls = [], []
    for _ in range(a.repeats):  # interleaved, best of each
        ones.append(call(1))
        fulls.append(call(a.new_tokens))
    res = {"prefill_s": min(ones), "total_s": min(fulls), "first_calls_s": first_s,
           **decode_rates(a.batch, a.new_tokens, min(ones), min(fulls))}
    print(header)
    for k, fmt in (("decode_tok_s", ".2f"), ("decode_step_ms", ".1f"), ("prefill_s", ".2f"), ("total_s", ".2f"),
                   ("first_calls_s", ".1f")):
        print(f"{k:16s} {res[k]:{fmt}}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                                      "engine": engine, "results": res}, indent=2))
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("vocab", 32000), ("hidden", 896), ("ffn", 4864), ("layers", 24), ("heads", 14),
                          ("kv-heads", 2), ("head-dim", 64), ("batch", 8), ("prompt-len", 128),
                          ("new-tokens", 128), ("repeats", 3), ("seed", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=0, help="1: Eigen single-threaded (pin the process with taskset)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if min(a.vocab, a.hidden, a.ffn, a.layers, a.heads, a.kv_heads, a.head_dim, a.batch, a.prompt_len,
           a.repeats) < 1 or a.new_tokens < 2 or a.heads % a.kv_heads:
        p.error("sizes must be >= 1, --new-tokens >= 2 and --heads a multiple of --kv-heads")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads == 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    try:
        import jax
        import numpy as np
        from flax import nnx
        from tunix.generate import sampler as tunix_sampler
        from tunix.models.qwen2 import model as tunix_qwen2
    except ImportError as e:
        sys.exit(f"bench_tunix.py runs in a virtual environment with google-tunix installed ({e})")

    cfg = tunix_qwen2.ModelConfig(
        num_layers=a.layers, vocab_size=a.vocab, embed_dim=a.hidden, hidden_dim=a.ffn, num_heads=a.heads,
        head_dim=a.head_dim, num_kv_heads=a.kv_heads, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=False,
    )
    model = tunix_qwen2.Qwen2(cfg, rngs=nnx.Rngs(a.seed))
    cache = tunix_sampler.CacheConfig(cache_size=a.prompt_len + a.new_tokens + 8, num_layers=a.layers,
                                      num_kv_heads=a.kv_heads, head_dim=a.head_dim)
    sampler = tunix_sampler.Sampler(model, IdTokenizer(), cache)
    rng = np.random.default_rng(a.seed)
    prompts = [" ".join(map(str, rng.integers(1, a.vocab, a.prompt_len))) for _ in range(a.batch)]

    def call(n: int) -> float:
        t = time.perf_counter()
        out = sampler(prompts, max_generation_steps=n, max_prompt_length=a.prompt_len, temperature=0.0)
        jax.block_until_ready(out.tokens)
        return time.perf_counter() - t

    header = (f"Tunix sampler: D={a.hidden} F={a.ffn} L={a.layers} H={a.heads}/{a.kv_heads} V={a.vocab}, B={a.batch} "
              f"P={a.prompt_len} N={a.new_tokens}, fp32, greedy; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs")
    time_and_report(call, a, "tunix", header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
