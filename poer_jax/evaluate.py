"""``python -m poer_jax.evaluate --model DIR_OR_CHECKPOINT [--data FILE] [--k K] [--temperature T] ...``

avg@k and pass@k (unbiased estimator) with math-verify and the training reward's answer extraction.
MODEL is an HF directory (e.g. a run's ``workdir/export``) or a training workdir / checkpoint directory
(its latest checkpoint's parameters, with the model and tokenizer named in the run's config). DATA is a
JSONL / Parquet file with a problem column and an answer (and/or solution) column: MATH-500, AIME and
AMC files in their usual formats work as they are. Prints a table; ``--json PATH`` writes the numbers.

Defaults come from the model when it was trained here: an export's ``eval_settings.json`` (or a
workdir's run config) gives the prompt settings (system prompt, chat template, prompt length, columns)
and the evaluation's (data, k, temperature, top-p, max new tokens, seed), so the command reports the
held-out accuracy the run printed. Flags override them; for other models the defaults are the open-rs
prompt and k=1, T=0.6, top-p 0.95.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _model_from_checkpoint(path: Path, mesh: Any) -> tuple[Any, Any, str, dict[str, Any]]:
    """(params, QwenConfig, tokenizer dir, eval settings) from a training workdir or its checkpoints directory."""
    import ml_collections

    from poer_jax.eval.settings import eval_settings
    from poer_jax.model import QwenConfig, init_params, load_hf, preset
    from poer_jax.model.lora import LoraConfig
    from poer_jax.rl import LossConfig
    from poer_jax.rl.optim import OptimConfig
    from poer_jax.rl.update import Trainer, create_train_state
    from poer_jax.train.checkpoint import Checkpointer

    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    with Checkpointer(ckpt_dir, keep=1000) as ckpt:
        if ckpt.latest_step() is None:
            raise ValueError(f"{path}: no HF config.json and no checkpoint found")
        extra = ckpt.restore_extra()
        cfg = ml_collections.ConfigDict(extra["config"])
        lc = cfg.get("lora")  # a LoRA run's checkpoints hold its adapters: merged into the base here
        lora = LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets), dropout=lc.dropout,
                          seed=cfg.seed) if lc is not None and lc.get("rank") else None
        stored = cfg.model.dtype if lora is not None else cfg.model.param_dtype  # a LoRA base: the compute dtype
        if cfg.model.path:
            params, mcfg = load_hf(cfg.model.path, mesh=mesh, param_dtype=stored, dtype=cfg.model.dtype)
        else:
            mcfg = preset(cfg.model.preset, param_dtype=stored, dtype=cfg.model.dtype)
            params = init_params(mcfg, __import__("jax").random.key(0))
        assert isinstance(mcfg, QwenConfig)
        mcfg = mcfg.replace(param_dtype=cfg.model.param_dtype)
        trainer = Trainer(mcfg, LossConfig(), OptimConfig(learning_rate=1e-6, total_steps=1), mesh=mesh, lora=lora)
        _, state, _, _ = ckpt.restore_latest_intact(create_train_state(params, trainer), move_broken=False)
    return trainer.policy_weights(state), mcfg, cfg.model.tokenizer_path or cfg.model.path, eval_settings(cfg)


# flag -> (settings key, built-in default when the model has no settings)
DEFAULTS: dict[str, tuple[str, Any]] = {
    "data": ("data", None), "k": ("k", 1), "temperature": ("temperature", 0.6), "top_p": ("top_p", 0.95),
    "max_new_tokens": ("max_new_tokens", 4096), "max_prompt_len": ("max_prompt_len", 1024),
    "chat_template": ("chat_template", "auto"), "system_prompt": ("system_prompt", None),
    "problem_key": ("problem_key", "problem"), "answer_key": ("answer_key", "answer"),
    "solution_key": ("solution_key", "solution"), "limit": ("limit", None), "seed": ("seed", 0),
    "dtype": ("dtype", "float32"),
}


def _fill_defaults(args: argparse.Namespace, settings: dict[str, Any]) -> list[str]:
    """Fill flags left unset from the model's settings, then the built-in defaults; returns the flags that
    came from the settings."""
    taken = []
    for flag, (key, default) in DEFAULTS.items():
        if getattr(args, flag) is None:
            if settings.get(key) is not None:
                setattr(args, flag, settings[key])
                taken.append(flag)
            else:
                setattr(args, flag, default)
    return taken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m poer_jax.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="HF directory, training workdir or checkpoints dir")
    ap.add_argument("--data", type=Path, default=None, help="default: the run's held-out file")
    ap.add_argument("--k", type=int, default=None, help="samples per problem (default: the run's eval.num_samples)")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--max-prompt-len", type=int, default=None)
    ap.add_argument("--chat-template", choices=("auto", "always", "never"), default=None)
    ap.add_argument("--system-prompt", default=None, help="default: the run's, else the open-rs system prompt")
    ap.add_argument("--problem-key", default=None)
    ap.add_argument("--answer-key", default=None)
    ap.add_argument("--solution-key", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32,
                    help="the most problems per sampler call (the problems are split into calls of equal size)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed, whose draws the "
                    "run's own evaluation used)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--timeout-s", type=float, default=10.0, help="math-verify deadline per answer")
    args = ap.parse_args(argv)
    if args.k is not None and args.k < 1:
        ap.error("--k must be >= 1")
    from poer_jax.platforms import use_present_platforms

    use_present_platforms()  # libtpu / the CUDA plugin installed without their hardware: do not start them


    from poer_jax.eval.evaluator import eval_key, evaluate
    from poer_jax.eval.settings import read_eval_settings
    from poer_jax.model import load_hf
    from poer_jax.model.config import ModelConfigError
    from poer_jax.model.sharding import make_mesh
    from poer_jax.sampler import GroupSampler, SamplerConfig, SamplingParams
    from poer_jax.system.data import ColumnMap, DataError, PromptConfig, load_dataset_file, tokenize_prompts
    from poer_jax.system.text import eos_and_pad, load_tokenizer
    from poer_jax.train.reward_pool import RewardPool

    mesh = make_mesh({"fsdp": -1})
    try:
        if (args.model / "config.json").is_file():
            settings = read_eval_settings(args.model)
            taken = _fill_defaults(args, settings)
            params, mcfg = load_hf(args.model, mesh=mesh, param_dtype=args.dtype, dtype=args.dtype)
            tok_dir: str | Path = args.model
        else:
            params, mcfg, tok_dir, settings = _model_from_checkpoint(args.model, mesh)
            taken = _fill_defaults(args, settings)
        if taken:
            print(f"settings of the training run: {', '.join(f'--{f.replace(chr(95), chr(45))}' for f in taken)}",
                  file=sys.stderr)
        if args.data is None:
            raise ValueError("--data is required: the model has no saved held-out file")
        tokenizer = load_tokenizer(tok_dir)
        eos_ids, pad_id = eos_and_pad(tokenizer, tok_dir)
        data = load_dataset_file(args.data, ColumnMap(problem=args.problem_key, solution=args.solution_key,
                                                      answer=args.answer_key,
                                                      options=("--problem-key", "--solution-key", "--answer-key")),
                                 limit=args.limit)
        pcfg = PromptConfig(chat_template=args.chat_template, max_prompt_len=args.max_prompt_len,
                            **({"system_prompt": args.system_prompt} if args.system_prompt is not None else {}))
        prompts = tokenize_prompts(tokenizer, data, pcfg)
    except (DataError, ModelConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    max_seq = args.max_prompt_len + args.max_new_tokens
    pages_per_seq = -(-max_seq // args.page_size) + 1
    slots = 1 << max(0, args.batch_size * args.k - 1).bit_length()
    scfg = SamplerConfig(page_size=args.page_size, num_pages=(slots + args.batch_size) * pages_per_seq + 8,
                         max_slots=slots, max_pages_per_seq=1 << (pages_per_seq - 1).bit_length(),
                         max_prefill_length=max_seq, eos_ids=eos_ids, pad_id=pad_id)
    sampler = GroupSampler(params, mcfg, scfg, mesh=mesh)
    rows = prompts.rows(range(len(prompts)))
    with RewardPool(["accuracy"], num_workers=2, timeout_s=args.timeout_s, on_error="zero") as grader:
        res = evaluate(sampler, tokenizer, list(prompts.ids), [r.get("solution") for r in rows],
                       [r.get("answer") for r in rows], k=args.k, max_new_tokens=args.max_new_tokens,
                       sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p),
                       key=eval_key(args.seed), grader=grader, batch_size=args.batch_size)
    m = res.metrics(prefix="")
    print(f"{'model':<14} {args.model}\n{'data':<14} {args.data} ({len(prompts)} problems, k={args.k}, "
          f"T={args.temperature})")
    for name in [f"avg@{args.k}"] + [k for k in m if k.startswith("pass@")] + ["mean_length", "time_s"]:
        value = m["accuracy"] if name.startswith("avg@") else m[name]
        print(f"{name:<14} {value:.4f}")
    if args.json:
        out = {"model": str(args.model), "data": str(args.data), "k": args.k, "temperature": args.temperature,
               "num_problems": len(prompts), f"avg@{args.k}": m["accuracy"], **{k: v for k, v in m.items()
                                                                                if k != "accuracy"},
               "per_problem_correct": res.correct.astype(int).tolist()}
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
