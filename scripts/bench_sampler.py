"""Benchmark the paged-KV group sampler: prefill / decode throughput, step latency, bandwidth roofline, and
optionally transformers ``generate`` on the same weights and prompts (``--vs-hf``).

    PYTHONPATH=. python scripts/bench_sampler.py --preset tiny --batch 8 --prompt-len 128 --new-tokens 128 \\
        --group 4 --vs-hf --json /tmp/bench.json

Model presets (random weights, real shapes): see ``poer_jax.model.presets``; 'tiny' runs on a CPU in seconds.
--batch is the number of sequences decoded together (B = groups x G); each group has its own random prompt of
--prompt-len tokens, prefilled once. No EOS: every sample decodes exactly --new-tokens tokens. Times are
the best of --repeats runs after a warm-up (medians are in the JSON too).

Roofline: a decode step must at least read every weight once (all parameters except the embedding table,
of which only B rows are read; a tied embedding is read in full as the output head) plus the KV cache
(2 * L * Hkv * hd * bytes per cached token; average context P + (N - 2) / 2). The sampler reads a group's
shared prompt pages once per step for all G samples, so its minimum KV traffic is the full pages of each
group's prompt once plus each sample's private tokens; decode_roofline_pct = time of that traffic at the
device bandwidth / measured step time. decode_roofline_pct_per_sample_kv counts every sample's whole context
(the bound of an engine without prefix sharing; equal when G = 1). Bandwidth: --bandwidth-gbs, else known by
device_kind (H100 SXM 3350 GB/s, H200 4800 GB/s, ...), else not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

KNOWN_BANDWIDTH_GBS = {  # device_kind substring -> HBM bandwidth, most specific first
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H100": 3350.0,
    "H200": 4800.0,
    "GH200": 4000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "L40S": 864.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v4": 1228.0,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        default="tiny",
        help="model preset: tiny (CPU), tiny-qwen3, r1-distill-qwen-1.5b, "
        "r1-distill-qwen-7b, qwen2.5-7b, qwen3-0.6b",
    )
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (groups x group size)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--group", type=int, default=1, help="samples per prompt (prefilled once per group)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--vs-hf", action="store_true", help="also time transformers generate on the same weights")
    p.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="device memory bandwidth for the roofline"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="compute/param dtype: auto (bf16 on accelerators, fp32 on CPU), float32, bfloat16",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attn-chunk-pages", type=int, default=None, help="default: by platform (sampler)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, comparable with HF)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin the process (JAX and torch) to this many CPU cores; fairer on a shared machine",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.batch % a.group:
        p.error(f"--batch {a.batch} is not a multiple of --group {a.group}")
    if min(a.batch, a.prompt_len, a.new_tokens, a.group, a.repeats) < 1:
        p.error("--batch, --prompt-len, --new-tokens, --group and --repeats must be >= 1")
    return a


def known_bandwidth(device_kind: str) -> float | None:
    for name, bw in KNOWN_BANDWIDTH_GBS.items():
        if name.lower() in device_kind.lower():
            return bw
    return None


def roofline_bytes_per_step(
    cfg: Any, params: Any, a: argparse.Namespace, kv_itemsize: int, share_prefix: bool
) -> float:
    """Minimum bytes one decode step reads (module docstring), at the run's average context."""
    import jax

    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    emb = params["embed"]
    if not cfg.tie_word_embeddings:  # only B rows of the table are gathered
        total -= emb.size * emb.dtype.itemsize - a.batch * emb.shape[1] * emb.dtype.itemsize
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
    context = a.prompt_len + max(a.new_tokens - 2, 0) / 2
    shared = (a.prompt_len // a.page_size) * a.page_size if share_prefix else 0
    groups = a.batch // a.group
    return float(total + (groups * shared + a.batch * (context - shared)) * kv)


def run_ours(a: argparse.Namespace, cfg: Any, params: Any, prompts: list[list[int]]) -> tuple[dict, Any]:
    import jax

    from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
    from poer_jax.sampler.pages import cdiv

    P, N, G = a.prompt_len, a.new_tokens, a.group
    pages = len(prompts) * (P // a.page_size) + a.batch * (cdiv(P + N - 1, a.page_size) - P // a.page_size)
    scfg = SamplerConfig(
        page_size=a.page_size,
        num_pages=pages + 1,
        max_pages_per_seq=cdiv(P + N, a.page_size),
        max_prefill_length=P,
        attn_chunk_pages=a.attn_chunk_pages,
        eos_ids=(),
        sampling=SamplingParams(temperature=a.temperature, top_p=a.top_p),
    )
    sampler = GroupSampler(params, cfg, scfg)
    t0 = time.perf_counter()
    out = sampler.generate(prompts, G, N, jax.random.key(a.seed))  # compile + first run
    compile_s = time.perf_counter() - t0
    runs = []
    for r in range(a.repeats):
        timing: dict[str, float] = {}
        out = sampler.generate(prompts, G, N, jax.random.key(a.seed + r), timing=timing)
        runs.append(timing)
    pre = min(t["prefill_s"] for t in runs)  # best of repeats: robust to other load on the machine
    dec = min(t["decode_s"] for t in runs)
    res = dict(
        compile_and_first_call_s=compile_s,
        prefill_s_median=statistics.median(t["prefill_s"] for t in runs),
        decode_s_median=statistics.median(t["decode_s"] for t in runs),
        prefill_s=pre,
        decode_s=dec,
        prefilled_tokens=out.prefilled_tokens,
        decoded_tokens=out.decoded_tokens,
        decode_steps=out.decode_steps,
        prefill_tok_s=out.prefilled_tokens / pre,
        decode_tok_s=out.decoded_tokens / dec,
        decode_step_ms=1e3 * dec / max(out.decode_steps, 1),
        prefill_us_per_token=1e6 * pre / out.prefilled_tokens,
        decode_us_per_token=1e6 * dec / max(out.decoded_tokens, 1),
    )
    res["decode_vs_prefill_cost_per_token"] = res["decode_us_per_token"] / res["prefill_us_per_token"]
    res["kv_itemsize"] = sampler._pages()[0].dtype.itemsize
    return res, out


def run_hf(a: argparse.Namespace, cfg: Any, params: Any, prompts: list[list[int]]) -> tuple[dict, Any]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from poer_jax.model.weights import export_hf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.threads:
        torch.set_num_threads(a.threads)
    tdtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    with tempfile.TemporaryDirectory() as d:
        export_hf(params, cfg, d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=tdtype).to(dev).eval()
    # HF has no prefix sharing: every sample carries (and prefills) its own copy of the prompt
    ids = torch.tensor(np.repeat(np.asarray(prompts), a.group, axis=0), device=dev)
    mask = torch.ones_like(ids)

    def gen(n: int) -> tuple[float, Any]:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    gen(2)  # warm-up
    ones = [gen(1)[0] for _ in range(a.repeats)]
    fulls = [gen(a.new_tokens) for _ in range(a.repeats)]
    one, full = min(ones), min(t for t, _ in fulls)  # best of repeats, as for poer_jax
    decoded = a.batch * (a.new_tokens - 1)
    res = dict(
        hf_device=dev,
        hf_prefill_s=one,
        hf_total_s=full,
        hf_total_s_median=statistics.median(t for t, _ in fulls),
        hf_prefill_tok_s=a.batch * a.prompt_len / one,
        hf_decode_tok_s=decoded / max(full - one, 1e-9),
        hf_decode_step_ms=1e3 * (full - one) / max(a.new_tokens - 1, 1),
    )
    return res, fulls[-1][1][:, ids.shape[1] :].cpu().numpy()


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:  # before jax / torch start their thread pools, which size themselves by the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.threads])
    if a.vs_hf:  # torch shares the accelerator: no up-front grab of 75 % of its memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import numpy as np

    from poer_jax.model.presets import preset
    from poer_jax.model.qwen import init_params

    dev = jax.devices()[0]
    dtype = a.dtype if a.dtype != "auto" else ("float32" if dev.platform == "cpu" else "bfloat16")
    cfg = preset(a.preset, dtype=dtype, param_dtype=dtype)
    params = init_params(cfg, jax.random.key(a.seed), std=0.02)
    rng = np.random.default_rng(a.seed)
    prompts = rng.integers(0, cfg.vocab_size, (a.batch // a.group, a.prompt_len)).tolist()

    res, out = run_ours(a, cfg, params, prompts)
    bw = a.bandwidth_gbs or known_bandwidth(dev.device_kind)
    kv_itemsize = res.pop("kv_itemsize")
    step_bytes = roofline_bytes_per_step(cfg, params, a, kv_itemsize, share_prefix=True)
    unshared_bytes = roofline_bytes_per_step(cfg, params, a, kv_itemsize, share_prefix=False)
    step_s = res["decode_step_ms"] / 1e3
    res.update(
        preset=a.preset,
        dtype=dtype,
        batch=a.batch,
        group=a.group,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        page_size=a.page_size,
        device=str(dev),
        device_kind=dev.device_kind,
        platform=dev.platform,
        cpu_count=os.cpu_count(),
        threads=len(os.sched_getaffinity(0)),
        jax_version=jax.__version__,
        decode_bytes_per_step=step_bytes,
        bandwidth_gbs=bw,
        decode_bytes_per_step_per_sample_kv=unshared_bytes,
        decode_roofline_pct=(100 * step_bytes / (bw * 1e9) / step_s) if bw else None,
        decode_roofline_pct_per_sample_kv=(100 * unshared_bytes / (bw * 1e9) / step_s) if bw else None,
    )
    if a.vs_hf:
        hf, hf_tokens = run_hf(a, cfg, params, prompts)
        res.update(hf)
        res["decode_speedup_vs_hf"] = res["decode_tok_s"] / res["hf_decode_tok_s"]
        res["end_to_end_speedup_vs_hf"] = res["hf_total_s"] / (res["prefill_s"] + res["decode_s"])
        if a.temperature == 0:
            res["hf_greedy_tokens_match"] = float((hf_tokens == out.tokens).all(axis=1).mean())
    print_table(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def print_table(res: dict) -> None:
    rows = [
        ("prefill tok/s", "prefill_tok_s", "hf_prefill_tok_s"),
        ("decode tok/s", "decode_tok_s", "hf_decode_tok_s"),
        ("decode step ms", "decode_step_ms", "hf_decode_step_ms"),
        ("prefill us/token", "prefill_us_per_token", None),
        ("decode us/token", "decode_us_per_token", None),
        ("decode/prefill cost per token", "decode_vs_prefill_cost_per_token", None),
        ("decode roofline %", "decode_roofline_pct", None),
        ("decode roofline % (per-sample KV)", "decode_roofline_pct_per_sample_kv", None),
        ("decode speedup vs HF", "decode_speedup_vs_hf", None),
        ("end-to-end speedup vs HF", "end_to_end_speedup_vs_hf", None),
        ("HF greedy tokens match", "hf_greedy_tokens_match", None),
    ]
    print(
        f"{res['preset']} {res['dtype']} B={res['batch']} G={res['group']} P={res['prompt_len']} "
        f"N={res['new_tokens']} page={res['page_size']} on {res['device_kind']} "
        f"({res['threads']} of {res['cpu_count']} CPUs)"
    )
    print(f"{'metric':34s} {'poer_jax':>14s} {'transformers':>14s}")

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:14.4g}" if isinstance(v, float) else f"{v!s:>14s}")

    for label, ours, hf in rows:
        if ours in res or (hf and hf in res):
            print(f"{label:34s} {fmt(res.get(ours))} {fmt(res.get(hf)) if hf else '':>14s}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
