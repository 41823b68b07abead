"""A quick smoke run: POER on a built-in short-answer arithmetic task with a tiny Qwen2 model, no download.

    python -m poer_jax.train --config=configs/arithmetic.py

Generates the task (problems with a short worked solution and a \\boxed{} answer), a character-level
tokenizer and a tiny random Qwen2 in workdir/toy, warm-starts it with a short supervised run (cached in
workdir/warm_start: a second run skips it), then trains with POER and prints the held-out accuracy.

Not POER's regime: the answers are ~42 tokens and their decisive tokens (copying the operands) come first, so
L = 48 regenerates nearly whole answers (POER decodes ~0.56 of GRPO's tokens here). The README's demo,
configs/toy.py, runs POER as the paper does, on long answers. Many tests start from this config: it is the
fastest complete run.
"""

from pathlib import Path

from poer_jax.system.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("toy.py"))  # the demo's settings, but for a short-answer task
    c.workdir = "runs/arithmetic_poer"
    c.toy.task = "arithmetic"
    c.toy.num_train = 2000
    c.toy.min_operands = 2
    c.toy.max_operands = 3
    c.toy.max_value = 9
    c.warm_start.path = None  # made on the spot (cached in workdir/warm_start)
    c.warm_start.steps = 500
    c.warm_start.min_lr_ratio = 1.0
    c.warm_start.micro_batches = 1
    c.data.system_prompt = "Answer in \\boxed{}."
    c.data.max_prompt_len = 96
    c.rollout.max_completion_len = 64
    c.cache.init = "sample"
    # The answers are ~40 tokens and their decisive tokens (copying the operands) come first: an L that
    # spans the whole answer lets the continuations reach them. scripts/bench_rollout.py measures the cost
    # with the paper's proportion instead (L = 300 of ~2700 tokens: --config.cache.max_truncation=4).
    c.cache.max_truncation = 48
    c.optim.learning_rate = 1e-4
    c.optim.micro_batches = 1
    c.train.checkpoint_every = 20
    c.eval.every = 10
    c.eval.max_new_tokens = 64
    return c
