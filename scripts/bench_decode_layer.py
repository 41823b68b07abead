"""Benchmark one decode layer's weight products outside the sampler: where a decode step's time goes.

A decode step reads every weight once, so on CPU its floor is the weights' bytes over the memory bandwidth. This
script times the model's own layer blocks (``qwen.attention_inputs`` / ``qwen.attention_output``: norms, the seven
weight products, RoPE, SwiGLU) for ``--rows`` rows (decode slots) over ``--layers`` layers in a ``fori_loop`` of
``--steps`` steps, with a stand-in for paged attention (each head's query as its output: no KV), so the layer's
weights stream from memory as in the sampler. Compare its ms per layer with ``bench_sampler.py``'s decode step
(docs/benchmarks.md): the difference is what the decode program spends outside the weight products.

Forms (``--forms``):
  model        the model's blocks, weights [in, out], Eigen dots (YNNPACK's dot fusions off)
  model_ynn    the same blocks with XLA:CPU's default dot handling (YNNPACK's dot fusions on)
  product_mlp  the MLP's products as a product and a float32 sum over transposed weights [out, in]
  product_all  every projection in that form
The product forms compile with YNNPACK's reduce fusion (``xla_cpu_experimental_ynn_fusion_type``) and keep
YNNPACK's dot fusions off; ``model_ynn`` compiles with XLA's defaults. The sampler's decode programs compile with
``engine.DECODE_COMPILER_OPTIONS``.

    taskset -c 1 python scripts/bench_decode_layer.py --threads 1 --json /tmp/layer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

FORMS = ("model", "model_ynn", "product_mlp", "product_all")
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--ffn", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=8, help="layers in the loop (their weights should exceed the cache)")
    p.add_argument("--rows", type=int, default=8, help="decode slots per step")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=4, help="timed calls per form, forms interleaved")
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--threads", type=int, default=0, help="1: Eigen single-threaded (pin the process with taskset)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    bad = [f for f in args.forms.split(",") if f not in FORMS]
    if bad:
        p.error(f"--forms: unknown {bad}; choose from {FORMS}")
    if min(args.hidden, args.ffn, args.heads, args.kv_heads, args.head_dim, args.layers, args.rows, args.steps,
           args.repeats) < 1 or args.heads % args.kv_heads:
        p.error("sizes must be >= 1 and --heads a multiple of --kv-heads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads == 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from poer_jax.model.config import QwenConfig
    from poer_jax.model.qwen import _linear, attention_inputs, attention_output, init_params, rms_norm

    cfg = QwenConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=args.layers,
                     num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim)
    stacked = init_params(cfg, jax.random.key(0))["layers"]
    layers = [{k: v[i] for k, v in stacked.items()} for i in range(args.layers)]
    weight_bytes = sum(layers[0][k].nbytes for k in ATTN + MLP)

    def product(x: jax.Array, wt: jax.Array) -> jax.Array:  # x [..., D], wt [F, D]
        x2 = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        return jnp.sum(x2[:, None, :] * wt[None], axis=-1).reshape(*x.shape[:-1], wt.shape[0])

    def mlp_product(lp: dict, x: jax.Array) -> jax.Array:
        h = rms_norm(x, lp["post_norm"], cfg.rms_norm_eps)
        return x + product(jax.nn.silu(product(h, lp["gate_proj"])) * product(h, lp["up_proj"]), lp["down_proj"])

    def layer(form: str, lp: dict, x: jax.Array, pos: jax.Array) -> jax.Array:
        if form == "product_all":
            h = rms_norm(x, lp["input_norm"], cfg.rms_norm_eps)
            q = product(h, lp["q_proj"]) + lp.get("q_bias", 0.0)
            kv = product(h, lp["k_proj"]) + lp.get("k_bias", 0.0) + product(h, lp["v_proj"]) + lp.get("v_bias", 0.0)
            attn = q + jnp.tile(kv, (1, 1, args.heads // args.kv_heads))  # the stand-in reads k and v too
            return mlp_product(lp, x + product(attn, lp["o_proj"]))
        q, k, v = attention_inputs(lp, cfg, x, pos)
        attn = q + jnp.repeat(k + v, args.heads // args.kv_heads, axis=2)  # [B, 1, Hq, hd]: the stand-in
        if form in ("model", "model_ynn"):
            return attention_output(lp, cfg, x, attn)
        B, T = attn.shape[:2]
        x = x + _linear(attn.reshape(B, T, -1), lp["o_proj"], None, cfg.jnp_dtype)
        return mlp_product(lp, x)

    def weights(form: str) -> list[dict]:
        names = {"model": (), "model_ynn": (), "product_mlp": MLP, "product_all": ATTN + MLP}[form]
        return [{k: (v.T if k in names else v) for k, v in lp.items()} for lp in layers]  # [out, in] copies

    def program(form: str):
        opts = {"model": {"xla_cpu_experimental_ynn_fusion_type": ""}, "model_ynn": {}}.get(
            form, {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"})

        def run(ws: list[dict], x: jax.Array) -> jax.Array:
            pos = jnp.zeros((x.shape[0], 1), jnp.int32)

            def body(i: jax.Array, x: jax.Array) -> jax.Array:
                for lp in ws:
                    x = layer(form, lp, x, pos + i)
                return x / (1.0 + jnp.abs(x).max())  # bounded, and every output element is used

            return jax.lax.fori_loop(0, args.steps, body, x)

        return jax.jit(run, compiler_options=opts)

    forms = args.forms.split(",")
    x0 = jax.random.normal(jax.random.key(1), (args.rows, 1, args.hidden), jnp.float32)
    runs = {f: (program(f), weights(f)) for f in forms}
    compile_s = {}
    for f, (fn, ws) in runs.items():
        t = time.perf_counter()
        fn(ws, x0).block_until_ready()
        compile_s[f] = time.perf_counter() - t
    times: dict[str, list[float]] = {f: [] for f in forms}
    for _ in range(args.repeats):
        for f, (fn, ws) in runs.items():
            t = time.perf_counter()
            fn(ws, x0).block_until_ready()
            times[f].append((time.perf_counter() - t) / args.steps / args.layers * 1e3)
    rows = []
    for f in forms:
        best = min(times[f])
        rows.append({"form": f, "ms_per_layer_min": best, "ms_per_layer_median": float(np.median(times[f])),
                     "weights_gb_per_s": weight_bytes / best / 1e6, "first_call_s": compile_s[f]})
    print(f"decode layer: D={args.hidden} F={args.ffn} H={args.heads}/{args.kv_heads} hd={args.head_dim} "
          f"rows={args.rows} layers={args.layers} steps={args.steps}, {weight_bytes / 1e6:.1f} MB of weights a layer, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'form':14s} {'ms/layer min':>13s} {'median':>8s} {'GB/s':>6s} {'first call s':>13s}")
    for r in rows:
        print(f"{r['form']:14s} {r['ms_per_layer_min']:13.2f} {r['ms_per_layer_median']:8.2f} "
              f"{r['weights_gb_per_s']:6.2f} {r['first_call_s']:13.1f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "weight_bytes_per_layer": weight_bytes, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
