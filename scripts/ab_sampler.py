"""A/B the group sampler of another checkout against this one, interleaved in ONE process (one thread).

    PYTHONPATH=. python scripts/ab_sampler.py --old /path/to/other/checkout --rounds 30 --json /tmp/ab.json

Separate processes on a shared machine see different load; here both samplers run in the same process on
the same weights and prompts, calls alternating old / new (order flipped every round), so load drifts hit
both alike. The other checkout's ``poer_jax`` is copied to a temporary directory as ``poer_jax_old`` (imports
rewritten) so both versions import side by side. Each setting first checks that both give the same tokens,
then reports median prefill / decode seconds and the median of the per-round new / old ratios (and the ratio
of the best times). Settings (tiny preset, random weights): plain batched decoding, groups sharing a prompt,
and a POER-like call (sampled, short continuations of long shared prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# name: (groups, G, prompt_len, new_tokens, page_size, temperature)
SETTINGS = {
    "B8_G1_P128_N128": (8, 1, 128, 128, 16, 0.0),
    "B32_G8_P256_N64": (4, 8, 256, 64, 16, 0.0),
    "poer_B48_G6_P200_N24_sampled": (8, 6, 200, 24, 16, 0.7),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, type=Path, help="checkout whose poer_jax is the reference")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not (a.old / "poer_jax" / "__init__.py").is_file():
        p.error(f"--old {a.old}: no poer_jax package there")
    if a.rounds < 2:
        p.error("--rounds must be >= 2")
    return a


def copy_as_old(checkout: Path, dest: Path) -> None:
    """``checkout/poer_jax`` -> ``dest/poer_jax_old`` with every ``poer_jax`` import renamed."""
    target = dest / "poer_jax_old"
    shutil.copytree(checkout / "poer_jax", target, ignore=shutil.ignore_patterns("__pycache__"))
    for f in target.rglob("*.py"):
        f.write_text(re.sub(r"\bpoer_jax\b", "poer_jax_old", f.read_text()))


def run(a: argparse.Namespace, old_dir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(old_dir))
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    import poer_jax_old.sampler as old_api  # type: ignore[import-not-found]

    import poer_jax.sampler as new_api
    from poer_jax.model.presets import preset
    from poer_jax.model.qwen import init_params

    cfg = preset(a.preset)
    params = init_params(cfg, jax.random.key(0), std=0.02)
    results: dict[str, Any] = {}
    for name, (ng, G, P, N, page, T) in SETTINGS.items():
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, cfg.vocab_size, P).tolist() for _ in range(ng)]
        samplers, first, firsts = {}, {}, {}
        for tag, api in (("old", old_api), ("new", new_api)):
            scfg = api.SamplerConfig(page_size=page, num_pages=ng * G * (-(-(P + N) // page) + 1) + 8,
                                     max_pages_per_seq=-(-(P + N) // page), max_prefill_length=P,
                                     sampling=api.SamplingParams(temperature=T))
            samplers[tag] = api.GroupSampler(params, cfg, scfg)
            t0 = time.perf_counter()
            first[tag] = samplers[tag].generate(prompts, G, N, jax.random.key(1))
            firsts[tag] = time.perf_counter() - t0
        if not (first["old"].tokens == first["new"].tokens).all():
            raise SystemExit(f"{name}: old and new sample different tokens")
        times: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for r in range(a.rounds):
            for tag in ("old", "new") if r % 2 == 0 else ("new", "old"):
                timing: dict[str, float] = {}
                samplers[tag].generate(prompts, G, N, jax.random.key(2 + r), timing=timing)
                times[tag].append(timing)
        row: dict[str, Any] = {"decode_steps": first["new"].decode_steps, "old_first_call_s": firsts["old"],
                               "new_first_call_s": firsts["new"]}
        for k in ("prefill_s", "decode_s"):
            old_t, new_t = [t[k] for t in times["old"]], [t[k] for t in times["new"]]
            row[f"old_{k}"], row[f"new_{k}"] = statistics.median(old_t), statistics.median(new_t)
            row[f"{k}_ratio"] = statistics.median(n / o for o, n in zip(old_t, new_t, strict=True))
            row[f"{k}_best_ratio"] = min(new_t) / min(old_t)
        results[name] = row
    return results


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # before jax sizes its thread pools
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        copy_as_old(a.old.resolve(), Path(tmp))
        results = run(a, Path(tmp))
    print(f"{'setting':<30} {'prefill new/old':>16} {'decode new/old':>15} {'(best-time ratios)':>20}")
    for name, r in results.items():
        print(f"{name:<30} {r['prefill_s_ratio']:>16.3f} {r['decode_s_ratio']:>15.3f} "
              f"{r['prefill_s_best_ratio']:>9.3f} {r['decode_s_best_ratio']:>9.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"old": str(a.old), "rounds": a.rounds, "preset": a.preset,
                                            "settings": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
