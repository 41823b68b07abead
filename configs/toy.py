"""The CPU demo: POER in its own regime on a built-in long-answer task with a tiny Qwen2 model, no download.

    python -m poer_jax.train --config=configs/toy.py

Generates the chain task (poer_jax/tasks/chain.py: 14-22 steps of one skill, answers of 160-248 tokens,
every step deciding the answer), its character-level tokenizer and held-out set in workdir/toy, starts from
the committed supervised warm start (assets/warm_start_chain, held-out accuracy 0.475; regenerate it with
``python scripts/warm_start.py --config=configs/toy.py --rows 1500 --target-accuracy 0.42 --eval-every 100``:
it stops at step 800 of a 2,000-step cosine schedule, as the model begins to copy the answer's second digit),
then trains with POER as the paper does it:

* L = 20, about 10 % of the mean answer (the paper: L = 300 of ~2,700 tokens), and the paper's continuation
  budget (up to the max completion length; the model stops at EOS);
* the cache pool initialised from the reference solutions, written as the warm start writes its answers
  (``</think>`` before the boxed answer, so a cut falls where the policy's own answers could be cut): a right
  prefix for every question from the first step. Sampling the pool would fill half of it with wrong answers,
  whose continuations cannot be right (the paper's Appendix D fills the pool from a teacher for the same
  reason). Updated epsilon-greedily (epsilon 0.1, best = correct first) after every step;
* 256 training questions at 16 a step, so every question comes back about 6 times in 100 steps and continues
  its updated cached answer (``cache/replayed_frac`` is 1.0 after the first 16 steps);
* the length-aware reward on correct answers (Eq. 10, ``correct_only``: the literal variant would score a
  wrong answer like a correct one of the group's mean length).

The held-out accuracy (128 problems, 4 samples each) is printed every 20 steps, and at the end with a paired
test against the start. Measured on a 2-core CPU (README, docs/benchmarks.md): 2 min 45 s in all (2026-12-06),
held-out 0.475 -> 0.531 (p = 0.043; seed 1: 0.529 -> 0.588, p = 0.029); POER decodes ~0.06-0.08 of GRPO's tokens
per sample in ~0.15-0.18 of its rollout time (docs/rollout.md: its decode steps set it); scripts/sweep_poer.py
compares POER with GRPO over seeds (README: 3 seeds, 512 held-out problems).
configs/arithmetic.py is a faster short-answer run, outside POER's regime.
"""

from pathlib import Path

from poer_jax.system.config import default_config

ROOT = Path(__file__).resolve().parents[1]


def get_config():
    c = default_config()
    c.workdir = "runs/toy_poer"
    c.seed = 0
    c.toy.enabled = True
    c.toy.task = "chain"
    c.toy.num_train = 256
    c.toy.num_test = 128
    c.toy.hidden_size = 64
    c.toy.num_layers = 2
    c.toy.min_operands = 14  # steps per problem
    c.toy.max_operands = 22
    # the constant added at each step: 0 or 1. With 0..9 the 2-layer, hidden-64 model's supervised run stalled at
    # ~89 % right sums (13 % whole answers) after 800 steps; the step (a 200-entry table) is learnt in a few hundred
    c.toy.max_value = 1
    # the committed warm start; scripts/warm_start.py makes it with these settings (on its own fresh rows)
    c.warm_start.path = str(ROOT / "assets" / "warm_start_chain")
    c.warm_start.steps = 2000  # at most: the committed one stopped at 800 (validation 0.46 >= --target-accuracy 0.42)
    c.warm_start.learning_rate = 3e-3
    c.warm_start.batch_size = 32
    c.warm_start.min_lr_ratio = 0.02
    c.warm_start.micro_batches = 16  # on a CPU, attention over 2 rows at a time stays in cache
    c.data.chat_template = "always"
    c.data.system_prompt = ""  # no system message: the task needs none, and every token is trained on
    c.data.max_prompt_len = 48
    c.data.questions_per_step = 16
    c.rollout.strategy = "poer"
    c.rollout.group_size = 6
    c.rollout.temperature = 1.0
    c.rollout.max_completion_len = 256
    c.rollout.page_size = 16
    c.cache.init = "solutions"
    c.cache.truncation = "fixed"
    c.cache.max_truncation = 20
    c.cache.budget = "max_length"
    c.cache.update_mode = "epsilon_greedy"
    c.cache.epsilon = 0.1
    c.reward.functions = ("accuracy",)
    c.reward.num_workers = 1
    c.reward.length_aware = True
    c.reward.length_variant = "correct_only"
    c.loss.beta = 0.0
    c.loss.aggregation = "token_mean"
    # 1e-4 rose for 10-20 steps and fell back (0.496 at step 60); 3e-5 held its rise (docs/benchmarks.md)
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 1.0
    c.optim.max_grad_norm = 1.0
    c.optim.micro_batches = 16  # 6 rows at a time: the same update, 2-3x faster on a CPU (attention in cache)
    c.train.max_steps = 100
    c.train.checkpoint_every = 50
    c.eval.every = 20
    c.eval.num_samples = 4
    c.eval.temperature = 0.6
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 256
    return c
