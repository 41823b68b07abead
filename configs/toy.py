"""The CPU demo: POER on a built-in arithmetic task with a tiny Qwen2 model, no download.

    python -m poer_jax.train --config=configs/toy.py

Generates the task (problems with a short worked solution and a \\boxed{} answer), a character-level
tokenizer and a tiny random Qwen2 in workdir/toy, warm-starts it with a short supervised run (cached in
workdir/warm_start: a second run skips it), then trains with POER and prints the held-out accuracy.
"""

from poer_jax.train.config import default_config


def get_config():
    c = default_config()
    c.workdir = "runs/toy_poer"
    c.seed = 0
    c.toy.enabled = True
    c.toy.num_train = 2000
    c.toy.num_test = 128
    c.toy.hidden_size = 64
    c.toy.num_layers = 2
    c.warm_start.steps = 500
    c.warm_start.learning_rate = 3e-3
    c.warm_start.batch_size = 32
    c.data.chat_template = "always"
    c.toy.max_value = 9
    c.toy.max_operands = 3
    c.data.system_prompt = "Answer in \\boxed{}."
    c.data.max_prompt_len = 96
    c.data.questions_per_step = 16
    c.rollout.strategy = "poer"
    c.rollout.group_size = 6
    c.rollout.temperature = 1.0
    c.rollout.max_completion_len = 64
    c.rollout.page_size = 16
    c.cache.init = "sample"
    # The toy's answers are ~40 tokens and their decisive tokens (copying the operands) come first: an L that
    # spans the whole answer lets the continuations reach them. scripts/bench_rollout.py measures the cost
    # with the paper's proportion instead (L = 300 of ~2700 tokens: --config.cache.max_truncation=4).
    c.cache.truncation = "fixed"
    c.cache.max_truncation = 48
    c.cache.budget = "max_length"
    c.cache.update_mode = "epsilon_greedy"
    c.cache.epsilon = 0.1
    c.reward.functions = ("accuracy",)
    c.reward.num_workers = 1
    c.reward.length_aware = True
    c.reward.length_variant = "correct_only"
    c.loss.beta = 0.0
    c.loss.aggregation = "token_mean"
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 1.0
    c.optim.max_grad_norm = 1.0
    c.train.max_steps = 100
    c.train.checkpoint_every = 20
    c.eval.every = 10
    c.eval.num_samples = 4
    c.eval.temperature = 0.6
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 64
    return c
