"""Check that poer_jax computes the same function as transformers for a local HF checkpoint.

    python scripts/check_parity.py MODEL_DIR [--dtype float32|bfloat16] [--prompts "text" ...]

Runs our model and the transformers reference (torch, CPU) on the same prompts (ragged, left-padded),
prints max |Δlogit|, top-1 agreement and mean KL(ref || ours), and exits non-zero above tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_PROMPTS = [
    "What is 17 * 23? Think step by step.",
    "The capital of France is",
    "def fibonacci(n):",
    "Solve for x: 2x + 3 = 11.",
]
TOLERANCES = {"float32": dict(max_abs=1e-3, top1=0.999, kl=1e-5), "bfloat16": dict(max_abs=None, top1=0.97, kl=2e-2)}


def _token_batch(model_dir: Path, prompts: list[str], vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise with the checkpoint's tokenizer if it has one, else random ids; left-padded."""
    ids: list[list[int]] = []
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [tok(p)["input_ids"] for p in prompts]
    if not ids or min(len(x) for x in ids) == 0:  # no usable tokenizer: random ids exercise the same path
        rng = np.random.RandomState(seed)
        ids = [list(rng.randint(0, vocab_size, size=8 + 5 * i)) for i in range(len(prompts))]
    T = max(len(x) for x in ids)
    tokens = np.zeros((len(ids), T), np.int32)
    mask = np.zeros((len(ids), T), bool)
    for b, x in enumerate(ids):
        tokens[b, T - len(x):] = x
        mask[b, T - len(x):] = True
    return tokens, mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32")
    ap.add_argument("--prompts", nargs="*", default=DEFAULT_PROMPTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-abs", type=float, default=None, help="override the max |Δlogit| tolerance")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()  # the test extra's libtpu / CUDA plugin without their hardware: not started

    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from poer_jax.model import forward_logits, load_hf, positions_from_mask

    params, cfg = load_hf(args.model_dir, param_dtype=args.dtype, dtype=args.dtype)
    tokens, mask = _token_batch(args.model_dir, args.prompts, cfg.vocab_size, args.seed)
    m = jnp.asarray(mask)
    ours = np.asarray(forward_logits(params, cfg, jnp.asarray(tokens), positions_from_mask(m), m))
    ref_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
    ours, ref = ours[mask], ref[mask]
    max_abs = float(np.abs(ours - ref).max())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    lp_ref = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lp_ours = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    kl = float((np.exp(lp_ref) * (lp_ref - lp_ours)).sum(-1).mean())

    tol = dict(TOLERANCES[args.dtype])
    if args.max_abs is not None:
        tol["max_abs"] = args.max_abs
    ok = (tol["max_abs"] is None or max_abs <= tol["max_abs"]) and top1 >= tol["top1"] and kl <= tol["kl"]
    print(f"{'model':<10} {args.model_dir}\n{'dtype':<10} {args.dtype} (reference: transformers float32, CPU)")
    print(f"{'tokens':<10} {int(mask.sum())} in {len(tokens)} prompts")
    print(f"{'max|Δ|':<10} {max_abs:.3e}   (tolerance {tol['max_abs']})")
    print(f"{'top-1':<10} {top1:.4f}      (tolerance >= {tol['top1']})")
    print(f"{'mean KL':<10} {kl:.3e}   (tolerance <= {tol['kl']})")
    print("PASS" if ok else "FAIL")
    if args.json:
        args.json.write_text(json.dumps(dict(max_abs=max_abs, top1=top1, kl=kl, dtype=args.dtype, ok=ok), indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
