"""Benchmark the paged-KV group sampler: prefill / decode throughput, compile time, step latency, bandwidth
roofline, and optionally transformers ``generate`` on the same weights and prompts (``--vs-hf``).

    PYTHONPATH=. python scripts/bench_sampler.py --preset h896 --batch 8 --prompt-len 128 --new-tokens 128 \\
        --vs-hf --threads 1 --json /tmp/bench.json

The model: ``--preset`` names a model preset of ``poer_jax.model.presets`` (random weights of a released
checkpoint's shape, e.g. r1-distill-qwen-1.5b) or one of BENCH_SHAPES below (h896: the CPU comparison shape,
hidden 896, 24 layers, 14 heads / 2 KV, FFN 4864, vocab 32k); ``--set KEY=VALUE`` overrides any QwenConfig
field (custom shapes: ``--set num_layers=4 --set vocab_size=8000``); ``--model-dir`` loads a local HF
directory instead (transformers loads the same directory). ``--dtype`` float32 / bfloat16 (auto: fp32 on CPU,
bf16 elsewhere) applies to both engines.

--batch is the number of sequences decoded together (B = groups x G); each group has its own random prompt of
--prompt-len tokens, prefilled once (transformers has no prefix sharing: it prefills every sample's copy).
No EOS: every sample decodes exactly --new-tokens tokens. Compile time (tracing + lowering + XLA) of the
first call is reported on its own; steady-state times are the best of --repeats calls after it (medians in
the JSON). With --vs-hf the two engines alternate call by call, so load from other jobs hits both alike;
every time is measured twice: wall clock and the process's CPU time (``*_cpu_*``: what a shared machine
inflates least). transformers' decode time is generate(N) - generate(1) (its prefill + first token).

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
import dataclasses
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

# Benchmark shapes that are not released checkpoints (QwenConfig fields).
BENCH_SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B's decoder with a 32k vocabulary and an untied head: the CPU comparison of issue 12.
    "h896": dict(
        vocab_size=32000, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        default="tiny",
        help="model preset (tiny, tiny-qwen3, qwen3-0.6b, r1-distill-qwen-1.5b, r1-distill-qwen-7b, "
        "qwen2.5-7b) or bench shape (h896)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a QwenConfig field")
    p.add_argument("--model-dir", default=None, help="a local HF directory instead of random weights")
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
        choices=("auto", "float32", "bfloat16"),
        help="compute/param dtype of both engines: auto = bf16 on accelerators, fp32 on CPU",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attn-chunk-pages", type=int, default=None, help="default: by platform (sampler)")
    p.add_argument("--attention-kernel", default="auto", help="SamplerConfig.attention_kernel")
    p.add_argument("--layer-loop", default="auto", help="SamplerConfig.layer_loop: auto, scan, unrolled")
    p.add_argument("--kv-layout", default="auto", help="SamplerConfig.kv_layout: auto, split, fused")
    p.add_argument("--matmul-kernel", default="auto", help="SamplerConfig.matmul_kernel: auto, xla, packed_cpu")
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
    if a.model_dir and a.set:
        p.error("--set changes a random model's shape; it cannot be combined with --model-dir")
    for kv in a.set:
        if "=" not in kv:
            p.error(f"--set {kv!r}: expected KEY=VALUE")
    return a


def known_bandwidth(device_kind: str) -> float | None:
    for name, bw in KNOWN_BANDWIDTH_GBS.items():
        if name.lower() in device_kind.lower():
            return bw
    return None


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs typed like the QwenConfig field they override."""
    from poer_jax.model.config import QwenConfig

    fields = {f.name: f for f in dataclasses.fields(QwenConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, value = item.split("=", 1)
        if key not in fields:
            raise SystemExit(f"--set {item}: {key!r} is not a QwenConfig field ({', '.join(sorted(fields))})")
        kind = str(fields[key].type)
        try:
            if "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif "int" in kind:
                out[key] = int(value)
            elif "float" in kind:
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise SystemExit(f"--set {item}: {value!r} is not a valid {kind} for {key}") from None
    return out


def build_model(a: argparse.Namespace, dtype: str) -> tuple[Any, Any]:
    """(cfg, params): a local HF directory, or random weights of a preset / bench shape (+ --set)."""
    import jax

    from poer_jax.model.config import QwenConfig
    from poer_jax.model.presets import preset
    from poer_jax.model.qwen import init_params
    from poer_jax.model.weights import load_hf

    if a.model_dir:
        params, cfg = load_hf(a.model_dir, dtype=dtype, param_dtype=dtype)
        return cfg, params
    if a.preset in BENCH_SHAPES:
        cfg = QwenConfig(**BENCH_SHAPES[a.preset], dtype=dtype, param_dtype=dtype)
    else:
        cfg = preset(a.preset, dtype=dtype, param_dtype=dtype)
    cfg = cfg.replace(**_parse_overrides(a.set))
    return cfg, init_params(cfg, jax.random.key(a.seed), std=0.02)


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


class Ours:
    """poer_jax's GroupSampler on the benchmark's prompts; ``first()`` compiles, ``run()`` is one timed call."""

    def __init__(self, a: argparse.Namespace, cfg: Any, params: Any, prompts: list[list[int]]) -> None:
        from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
        from poer_jax.sampler.pages import cdiv

        P, N = a.prompt_len, a.new_tokens
        pages = len(prompts) * (P // a.page_size) + a.batch * (cdiv(P + N - 1, a.page_size) - P // a.page_size)
        scfg = SamplerConfig(
            page_size=a.page_size,
            num_pages=pages + 1,
            max_slots=a.batch,
            max_pages_per_seq=cdiv(P + N, a.page_size),
            max_prefill_length=P,
            attn_chunk_pages=a.attn_chunk_pages,
            attention_kernel=a.attention_kernel,
            layer_loop=a.layer_loop,
            matmul_kernel=a.matmul_kernel,
            kv_layout=a.kv_layout,
            eos_ids=(),
            sampling=SamplingParams(temperature=a.temperature, top_p=a.top_p),
        )
        self.a, self.prompts = a, prompts
        self.sampler = GroupSampler(params, cfg, scfg)
        self.runs: list[dict[str, float]] = []
        self.out: Any = None

    def first(self) -> dict[str, float]:
        import jax

        from poer_jax.sampler.compiles import CompileLog

        t0, c0 = time.perf_counter(), time.process_time()
        with CompileLog() as log:
            self.out = self.sampler.generate(self.prompts, self.a.group, self.a.new_tokens, jax.random.key(self.a.seed))
        return dict(
            first_call_s=time.perf_counter() - t0,
            first_call_cpu_s=time.process_time() - c0,
            compile_s=log.seconds(),
            compiled_programs=log.count(),
        )

    def run(self, r: int) -> None:
        import jax

        timing: dict[str, float] = {}
        key = jax.random.key(self.a.seed + r)
        self.out = self.sampler.generate(self.prompts, self.a.group, self.a.new_tokens, key, timing=timing)
        self.runs.append(timing)

    def results(self) -> dict[str, Any]:
        out, runs = self.out, self.runs
        res: dict[str, Any] = dict(
            prefilled_tokens=out.prefilled_tokens, decoded_tokens=out.decoded_tokens, decode_steps=out.decode_steps
        )
        for k in ("prefill_s", "decode_s", "prefill_cpu_s", "decode_cpu_s"):
            res[k] = min(t[k] for t in runs)  # best of repeats: robust to other load on the machine
            res[k + "_median"] = statistics.median(t[k] for t in runs)
        res["total_s"] = min(t["prefill_s"] + t["decode_s"] for t in runs)
        res["total_cpu_s"] = min(t["prefill_cpu_s"] + t["decode_cpu_s"] for t in runs)
        pre, dec = res["prefill_s"], res["decode_s"]
        res.update(
            prefill_tok_s=out.prefilled_tokens / pre,
            decode_tok_s=out.decoded_tokens / dec,
            decode_tok_cpu_s=out.decoded_tokens / res["decode_cpu_s"],
            decode_step_ms=1e3 * dec / max(out.decode_steps, 1),
            prefill_us_per_token=1e6 * pre / out.prefilled_tokens,
            decode_us_per_token=1e6 * dec / max(out.decoded_tokens, 1),
        )
        res["decode_vs_prefill_cost_per_token"] = res["decode_us_per_token"] / res["prefill_us_per_token"]
        return res


class HF:
    """transformers generate on the same weights and prompts (every sample carries its own prompt copy)."""

    def __init__(self, a: argparse.Namespace, cfg: Any, params: Any, prompts: list[list[int]]) -> None:
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM

        from poer_jax.model.weights import export_hf

        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        if a.threads:
            torch.set_num_threads(a.threads)
        tdtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        if a.model_dir:
            model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=tdtype)
        else:
            with tempfile.TemporaryDirectory() as d:
                export_hf(params, cfg, d)
                model = AutoModelForCausalLM.from_pretrained(d, dtype=tdtype)
        self.model = model.to(self.dev).eval()
        self.ids = torch.tensor(np.repeat(np.asarray(prompts), a.group, axis=0), device=self.dev)
        self.a = a
        self.runs: list[dict[str, float]] = []
        self.tokens: Any = None

    def _gen(self, n: int) -> tuple[float, float, Any]:
        import torch

        if self.dev == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=self.ids,
                attention_mask=torch.ones_like(self.ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        if self.dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, out

    def first(self) -> None:
        import torch

        with torch.inference_mode():  # warm-up on one short row: the timed calls then run warm
            self.model.generate(
                input_ids=self.ids[:1, :16], attention_mask=torch.ones_like(self.ids[:1, :16]), max_new_tokens=2,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )

    def run(self, r: int) -> None:
        one, one_cpu, _ = self._gen(1)
        full, full_cpu, out = self._gen(self.a.new_tokens)
        self.tokens = out[:, self.ids.shape[1] :].cpu().numpy()
        self.runs.append(dict(one=one, one_cpu=one_cpu, full=full, full_cpu=full_cpu))

    def results(self) -> dict[str, Any]:
        a, runs = self.a, self.runs
        one, full = min(t["one"] for t in runs), min(t["full"] for t in runs)
        one_cpu, full_cpu = min(t["one_cpu"] for t in runs), min(t["full_cpu"] for t in runs)
        decoded = a.batch * (a.new_tokens - 1)
        return dict(
            hf_device=self.dev,
            hf_prefill_s=one,
            hf_total_s=full,
            hf_total_s_median=statistics.median(t["full"] for t in runs),
            hf_total_cpu_s=full_cpu,
            hf_prefill_tok_s=a.batch * a.prompt_len / one,
            hf_decode_tok_s=decoded / max(full - one, 1e-9),
            hf_decode_tok_cpu_s=decoded / max(full_cpu - one_cpu, 1e-9),
            hf_decode_step_ms=1e3 * (full - one) / max(a.new_tokens - 1, 1),
        )


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.threads:  # before jax / torch start their thread pools, which size themselves by the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.threads])
    if a.vs_hf:  # torch shares the accelerator: no up-front grab of 75 % of its memory
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()  # the test extra's libtpu / CUDA plugin without their hardware: not started
    import jax
    import numpy as np

    dev = jax.devices()[0]
    dtype = a.dtype if a.dtype != "auto" else ("float32" if dev.platform == "cpu" else "bfloat16")
    cfg, params = build_model(a, dtype)
    rng = np.random.default_rng(a.seed)
    prompts = rng.integers(0, cfg.vocab_size, (a.batch // a.group, a.prompt_len)).tolist()

    engines: list[Any] = [Ours(a, cfg, params, prompts)]
    res: dict[str, Any] = engines[0].first()
    if a.vs_hf:
        engines.append(HF(a, cfg, params, prompts))
        engines[1].first()
    for r in range(a.repeats):  # interleaved: both engines see the same machine load
        for e in engines:
            e.run(r)
    res.update(engines[0].results())
    out = engines[0].out
    bw = a.bandwidth_gbs or known_bandwidth(dev.device_kind)
    kv_itemsize = engines[0].sampler._pages()[0].dtype.itemsize
    step_bytes = roofline_bytes_per_step(cfg, params, a, kv_itemsize, share_prefix=True)
    unshared_bytes = roofline_bytes_per_step(cfg, params, a, kv_itemsize, share_prefix=False)
    step_s = res["decode_step_ms"] / 1e3
    res.update(
        preset=a.model_dir or a.preset,
        overrides=a.set,
        model=dict(
            layers=cfg.num_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size, heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size, tied=cfg.tie_word_embeddings,
        ),
        dtype=dtype,
        batch=a.batch,
        group=a.group,
        prompt_len=a.prompt_len,
        new_tokens=a.new_tokens,
        page_size=a.page_size,
        layer_loop=engines[0].sampler.unroll_layers and "unrolled" or "scan",
        matmul_kernel="packed_cpu" if engines[0].sampler.packed_matmuls else "xla",
        kv_layout="fused" if engines[0].sampler.attention_kernel.fused_pool else "split",
        device=str(dev),
        device_kind=dev.device_kind,
        platform=dev.platform,
        cpu_count=os.cpu_count(),
        threads=len(os.sched_getaffinity(0)),
        load_average=os.getloadavg(),
        jax_version=jax.__version__,
        decode_bytes_per_step=step_bytes,
        bandwidth_gbs=bw,
        decode_bytes_per_step_per_sample_kv=unshared_bytes,
        decode_roofline_pct=(100 * step_bytes / (bw * 1e9) / step_s) if bw else None,
        decode_roofline_pct_per_sample_kv=(100 * unshared_bytes / (bw * 1e9) / step_s) if bw else None,
    )
    if a.vs_hf:
        res.update(engines[1].results())
        res["decode_speedup_vs_hf"] = res["decode_tok_s"] / res["hf_decode_tok_s"]
        res["decode_speedup_vs_hf_cpu"] = res["decode_tok_cpu_s"] / res["hf_decode_tok_cpu_s"]
        res["end_to_end_speedup_vs_hf"] = res["hf_total_s"] / res["total_s"]
        res["end_to_end_speedup_vs_hf_cpu"] = res["hf_total_cpu_s"] / res["total_cpu_s"]
        if a.temperature == 0:
            res["hf_greedy_tokens_match"] = float((engines[1].tokens == out.tokens).all(axis=1).mean())
    print_table(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def print_table(res: dict) -> None:
    rows = [
        ("compile s (first call)", "compile_s", None),
        ("first call s", "first_call_s", None),
        ("prefill tok/s", "prefill_tok_s", "hf_prefill_tok_s"),
        ("decode tok/s", "decode_tok_s", "hf_decode_tok_s"),
        ("decode tok per CPU-s", "decode_tok_cpu_s", "hf_decode_tok_cpu_s"),
        ("decode step ms", "decode_step_ms", "hf_decode_step_ms"),
        ("total s (prefill + decode)", "total_s", "hf_total_s"),
        ("total CPU-s", "total_cpu_s", "hf_total_cpu_s"),
        ("prefill us/token", "prefill_us_per_token", None),
        ("decode us/token", "decode_us_per_token", None),
        ("decode/prefill cost per token", "decode_vs_prefill_cost_per_token", None),
        ("decode roofline %", "decode_roofline_pct", None),
        ("decode roofline % (per-sample KV)", "decode_roofline_pct_per_sample_kv", None),
        ("decode speedup vs HF", "decode_speedup_vs_hf", None),
        ("decode speedup vs HF (CPU time)", "decode_speedup_vs_hf_cpu", None),
        ("end-to-end speedup vs HF", "end_to_end_speedup_vs_hf", None),
        ("end-to-end speedup vs HF (CPU time)", "end_to_end_speedup_vs_hf_cpu", None),
        ("HF greedy tokens match", "hf_greedy_tokens_match", None),
    ]
    m = res["model"]
    print(
        f"{res['preset']} (L={m['layers']} D={m['hidden']} F={m['ffn']} H={m['heads']}/{m['kv_heads']} "
        f"V={m['vocab']}) {res['dtype']} B={res['batch']} G={res['group']} P={res['prompt_len']} "
        f"N={res['new_tokens']} page={res['page_size']} layers={res['layer_loop']} "
        f"matmul={res['matmul_kernel']} on {res['device_kind']} "
        f"({res['threads']} of {res['cpu_count']} CPUs, load {res['load_average'][0]:.1f})"
    )
    print(f"{'metric':36s} {'poer_jax':>14s} {'transformers':>14s}")

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:14.4g}" if isinstance(v, float) else f"{v!s:>14s}")

    for label, ours, hf in rows:
        if ours in res or (hf and hf in res):
            print(f"{label:36s} {fmt(res.get(ours))} {fmt(res.get(hf)) if hf else '':>14s}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
