"""First contact with a real accelerator (GPU or TPU host): five checks in under 8 minutes, one line each and a JSON.

    PYTHONPATH=. python scripts/accelerator_check.py [--json accelerator_check.json] [--checks parity,sampler]
        [--timeout NAME=SECONDS ...] [--tiny]

  parity         transformers (torch, CPU) and poer_jax (the accelerator) on the same random weights, saved as a
                 Hugging Face directory in a temporary directory, in bfloat16 (scripts/check_parity.py's
                 tolerances: top-1 agreement >= 0.97, mean KL <= 0.02; float32 with --tiny)
  sampler        the paged-KV sampler's greedy samples against a full recompute of the same sequences: the
                 recomputed argmax at every decisive position (top-1 margin > 0.1) is the sampled token, and the
                 sampler's policy log-probs match the recomputed ones
  train          3 training steps (POER) of the R1-Distill-Qwen-1.5B shape with random weights on the built-in
                 task: finite loss and gradient norm in every step (metrics.jsonl)
  bench_sampler  scripts/bench_sampler.py at the 1.5B shape (64 samples, groups of 8, 512-token prompts, 128 new
                 tokens): decode tokens/s, step time, % of the bandwidth roofline
  bench_rollout  scripts/bench_rollout.py at the 1.5B shape (3 steps of POER and of GRPO): decoded-token and
                 step-time ratios

Each check runs in its own process with its own timeout (``--timeout NAME=SECONDS``; the defaults add up to 470 s),
so a crash, a hang or an out-of-memory in one does not stop the others; the parent never starts a JAX backend (it
would hold the accelerator's memory). Exit 0 when every check passes. ``--tiny`` runs the same code on tiny
shapes (any CPU, seconds per check: the test suite's). The first session with a GPU or a TPU runs it and records
the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("parity", "sampler", "train", "bench_sampler", "bench_rollout")
TIMEOUTS = {"parity": 80.0, "sampler": 80.0, "train": 110.0, "bench_sampler": 80.0, "bench_rollout": 120.0}
TINY_TIMEOUT = 600.0  # --tiny: a smoke run on whatever CPU, however loaded
FULL = dict(preset="r1-distill-qwen-1.5b", dtype="bfloat16", prompts=4, prompt_len=128, new_tokens=64, group=4,
            bench=["--batch", "64", "--group", "8", "--prompt-len", "512", "--new-tokens", "128", "--repeats", "2"],
            rollout=["--config.data.questions_per_step=8", "--config.rollout.group_size=4",
                     "--config.optim.micro_batches=4", "--config.rollout.max_completion_len=256",
                     "--config.cache.init=sample"])
TINY = dict(preset="tiny", dtype="float32", prompts=2, prompt_len=12, new_tokens=6, group=2,
            bench=["--batch", "4", "--group", "2", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"],
            rollout=["--config.data.questions_per_step=2", "--config.rollout.group_size=2",
                     "--config.optim.micro_batches=1", "--config.rollout.max_completion_len=24",
                     "--config.cache.init=sample", "--config.toy.num_train=8", "--config.toy.num_test=2",
                     "--config.data.max_prompt_len=96", "--config.toy.min_operands=2", "--config.toy.max_operands=3",
                     "--config.mesh.num_devices=1"])


def _device() -> dict[str, Any]:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "num_devices": jax.device_count(),
            "jax": jax.__version__}


# ---- the checks (each runs in a child process: ``--run-one NAME``) --------------------------------------------
def check_parity(scale: dict, tmp: Path) -> tuple[bool, str, dict]:
    """A random HF checkpoint of the preset's shape (bf16), then scripts/check_parity.py on it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from poer_jax.model.presets import preset

    c = preset(scale["preset"])
    hf = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                     tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=4096, eos_token_id=1,
                     pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2ForCausalLM(hf)
    with torch.no_grad():  # as tests/hf_fixtures.py: every weight matters, logits spread over several units
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(tmp / "hf")
    del model
    torch.set_default_dtype(torch.float32)
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_parity

    out = tmp / "parity.json"
    rc = check_parity.main([str(tmp / "hf"), "--dtype", scale["dtype"], "--json", str(out)])
    res = json.loads(out.read_text()) if out.is_file() else {}
    line = ", ".join(f"{k} {res[k]:.4g}" for k in ("max_abs", "top1", "kl") if isinstance(res.get(k), float))
    return rc == 0, f"{scale['preset']} {scale['dtype']} vs transformers: {line}", res


def check_sampler(scale: dict, tmp: Path) -> tuple[bool, str, dict]:
    """Greedy samples of the paged-KV sampler against a teacher-forced recompute of the whole sequences."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from poer_jax.model import forward_logits, init_params, positions_from_mask, preset
    from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
    from poer_jax.sampler.pages import cdiv

    cfg = preset(scale["preset"], dtype=scale["dtype"], param_dtype=scale["dtype"])
    params = init_params(cfg, jax.random.key(0), std=0.02)
    params["lm_head"] = params["lm_head"] * 8  # logits spread over several units: few near-ties
    n, P, N, G, page = scale["prompts"], scale["prompt_len"], scale["new_tokens"], scale["group"], 16
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (n, P)).tolist()
    scfg = SamplerConfig(page_size=page, num_pages=n * G * cdiv(P + N, page) + 1, max_slots=n * G,
                         max_pages_per_seq=cdiv(P + N, page), max_prefill_length=P, eos_ids=(),
                         sampling=SamplingParams(temperature=0.0))
    out = GroupSampler(params, cfg, scfg).generate(prompts, G, N, jax.random.key(1))
    seqs = np.concatenate([np.repeat(np.asarray(prompts), G, axis=0), out.tokens[:, :N]], axis=1)
    mask = jnp.ones(seqs.shape, bool)
    logits = np.asarray(forward_logits(params, cfg, jnp.asarray(seqs), positions_from_mask(mask), mask),
                        np.float32)[:, P - 1:-1]  # the logits that chose each new token
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > 0.1
    agree = float((logits.argmax(-1) == out.tokens[:, :N])[decisive].mean())
    recomputed = np.take_along_axis(logp, out.tokens[:, :N, None], axis=-1)[..., 0]
    dlogp = float(np.abs(recomputed - out.policy_logprobs[:, :N]).max())
    tol = 0.05 if scale["dtype"] == "bfloat16" else 1e-3
    ok = agree == 1.0 and dlogp <= tol and int(out.lengths.min()) == N
    res = {"samples": n * G, "new_tokens": N, "decisive_positions": int(decisive.sum()), "top1_agreement": agree,
           "max_abs_logprob_diff": dlogp, "tolerance": tol}
    return ok, (f"{n * G} greedy samples x {N} tokens: argmax agreement {agree:.4f} over {int(decisive.sum())} "
                f"decisive positions, max |d logprob| {dlogp:.2e} (tol {tol:g})"), res


def _rollout_module() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_rollout

    return bench_rollout


def check_train(scale: dict, tmp: Path) -> tuple[bool, str, dict]:
    """3 POER steps of the preset's shape (random weights) on the built-in task, through the trainer."""
    import math

    from poer_jax.system.config import apply_overrides, load_config_file, validate
    from poer_jax.train.loop import PoerTrainer

    br = _rollout_module()
    over = [a[len("--config."):] for a in scale["rollout"]]
    cfg = validate(apply_overrides(load_config_file(ROOT / "configs/toy.py"), over))
    cfg = br._prepare(cfg, tmp / "base", preset=scale["preset"], dtype=scale["dtype"])
    cfg = validate(apply_overrides(cfg, ["rollout.strategy=poer", f"workdir={tmp / 'poer'}", "train.max_steps=3"]))
    trainer = PoerTrainer(cfg)
    rows, times = [], []
    try:
        while trainer.step < 3:
            t0 = time.perf_counter()
            rows.append(trainer.train_step())
            times.append(time.perf_counter() - t0)
    finally:
        trainer.close()
    watched = {k: [float(row[k]) for row in rows] for k in sorted(rows[0]) if k.endswith(("loss", "grad_norm"))}
    finite = len(rows) == 3 and bool(watched) and all(math.isfinite(v) for vs in watched.values() for v in vs)
    shown = ", ".join(f"{k} {vs[-1]:.3g}" for k, vs in list(watched.items())[:2])
    return finite, (f"3 POER steps of {scale['preset']}: {shown}; {times[0]:.1f} s for the first (compiles), "
                    f"then {min(times[1:]):.2f} s a step"), {"steps": len(rows), "strategy": "poer",
                                                              "step_s": times, "watched": watched}


def check_bench_sampler(scale: dict, tmp: Path) -> tuple[bool, str, dict]:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_sampler

    res = bench_sampler.main(["--preset", scale["preset"], "--dtype", scale["dtype"], *scale["bench"],
                              "--json", str(tmp / "bench_sampler.json")])
    roof = res.get("decode_roofline_pct")
    ok = res["decoded_tokens"] > 0 and res["decode_tok_s"] > 0
    return ok, (f"{scale['preset']}: decode {res['decode_tok_s']:.0f} tok/s, step {res['decode_step_ms']:.2f} ms"
                + (f", {roof:.0f} % of the bandwidth roofline" if roof else "")
                + f", prefill {res['prefill_tok_s']:.0f} tok/s"), res


def check_bench_rollout(scale: dict, tmp: Path) -> tuple[bool, str, dict]:
    br = _rollout_module()
    out = tmp / "bench_rollout.json"
    rc = br.main([f"--config={ROOT / 'configs/toy.py'}", "--preset", scale["preset"], "--dtype", scale["dtype"],
                  "--steps", "3", "--workdir", str(tmp / "w"), "--json", str(out), *scale["rollout"]])
    res = json.loads(out.read_text()) if out.is_file() else {}
    ok = rc == 0 and bool(res)
    return ok, (f"{scale['preset']} POER / GRPO: decoded tokens {res.get('decoded_tokens_ratio', float('nan')):.3f}, "
                f"step time {res.get('step_time_ratio', float('nan')):.3f}"), res


RUNNERS = {"parity": check_parity, "sampler": check_sampler, "train": check_train,
           "bench_sampler": check_bench_sampler, "bench_rollout": check_bench_rollout}


def run_one(name: str, tiny: bool, out: Path) -> int:
    """Child process: one check, its result written to ``out`` as JSON."""
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()
    scale = TINY if tiny else FULL
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"accel_{name}_") as tmp:
        try:
            ok, summary, details = RUNNERS[name](scale, Path(tmp))
            result = {"status": "PASS" if ok else "FAIL", "summary": summary, "details": details}
        except Exception as e:  # noqa: BLE001  (a check's failure is its result)
            first = str(e).splitlines()[0][:300] if str(e) else ""
            result = {"status": "ERROR", "summary": f"{type(e).__name__}: {first}", "details": {}}
    result["seconds"] = time.perf_counter() - t0
    result["device"] = _device()
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def _run_child(name: str, tiny: bool, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="accel_result_") as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", name, "--result", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd + (["--tiny"] if tiny else []), capture_output=True, text=True,
                                  timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        except subprocess.TimeoutExpired:
            return {"status": "TIMEOUT", "summary": f"no result within {timeout:.0f} s", "seconds": timeout}
        if out.is_file():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "ERROR", "summary": f"exit {proc.returncode}: {tail[0][:300]}",
                "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, the test suite)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS", help="a check's time limit")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_one:
        return run_one(a.run_one, a.tiny, a.result)
    names = [n for n in a.checks.split(",") if n]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        ap.error(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    timeouts = {n: TINY_TIMEOUT for n in CHECKS} if a.tiny else dict(TIMEOUTS)
    for item in a.timeout:
        name, _, value = item.partition("=")
        if name not in CHECKS or not value.replace(".", "", 1).isdigit():
            ap.error(f"--timeout {item!r}: expected NAME=SECONDS with NAME in {', '.join(CHECKS)}")
        timeouts[name] = float(value)
    results = []
    for name in names:
        r = {"name": name, **_run_child(name, a.tiny, timeouts[name])}
        results.append(r)
        print(f"{r['status']:<8}{name:<15}{r['seconds']:7.1f} s  {r['summary']}", flush=True)
    device = next((r["device"] for r in results if "device" in r), None)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "scale": "tiny" if a.tiny else "full", "device": device,
              "passed": all(r["status"] == "PASS" for r in results), "checks": results}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
