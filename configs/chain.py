"""POER in its own regime on a built-in long-answer task with a tiny Qwen2 model, no download (work in progress:
the README's demo is still configs/toy.py).

    python -m poer_jax.train --config=configs/chain.py

Status (2026-11-30, 2-core CPU): the committed warm start is right on 47.5 % of held-out answers (avg@4);
nearly all its errors are the answer's second digit (``eval/error/box_second``), a copy it has partly learnt.
100 POER steps took it to 0.531 (paired test against the start p = 0.043; GRPO: 0.545) while POER's rollouts
decoded 0.050 of GRPO's tokens in 0.31 of its rollout time (docs/benchmarks.md, "POER in its own regime").
Not yet the README's demo.

Generates the chain task (poer_jax/tasks/chain.py: 14-22 steps of one skill, answers of 160-248 tokens,
every step deciding the answer), its character-level tokenizer and held-out set in workdir/toy, starts from
the committed supervised warm start (assets/warm_start_chain; regenerate it with
``python scripts/warm_start.py --config=configs/chain.py --rows 1500 --target-accuracy 0.42 --eval-every 100``:
stopped at step 800 of a 2,000-step cosine schedule, just as the model begins to copy the answer's second digit,
held-out accuracy 0.475), then trains with POER as the paper does it:

* L = 20, about 10 % of the mean answer (the paper: L = 300 of ~2,700 tokens), and the paper's continuation
  budget (up to the max completion length; the model stops at EOS);
* the cache pool initialised from the reference solutions, written as the warm start writes its answers
  (``</think>`` before the boxed answer: a cut then falls where the policy's own answers could be cut): a
  right prefix for every question from the first step (the paper's Appendix D fills the pool from a teacher
  for the same reason); updated epsilon-greedily (epsilon 0.1, best = correct first) after every step;
* 256 training questions at 16 a step, so every question comes back about 6 times in 100 steps and continues
  its updated cached answer;
* the length-aware reward on correct answers (Eq. 10, ``correct_only``: the literal variant would score a
  wrong answer like a correct one of the group's mean length).

The held-out accuracy (128 problems, 4 samples each) is printed every 20 steps, and at the end with a paired
test against the start.
"""

from pathlib import Path

from poer_jax.train.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def get_config():
    c = load_config_file(Path(__file__).with_name("toy.py"))  # the demo's settings, but for the task and POER's regime
    c.workdir = "runs/chain_poer"
    c.toy.task = "chain"
    c.toy.num_train = 256
    c.toy.min_operands = 14  # steps per problem
    c.toy.max_operands = 22
    # the constant added at each step: 0 or 1. With 0..9 the 2-layer, hidden-64 model's supervised run stalled at
    # ~89 % right sums (13 % whole answers) after 800 steps; the step (a 200-entry table) is learnt in a few hundred
    c.toy.max_value = 1
    # the committed warm start; scripts/warm_start.py makes it with these settings (on its own fresh rows)
    c.warm_start.path = str(ROOT / "assets" / "warm_start_chain")
    c.warm_start.steps = 2000  # at most: the committed one stopped at 800 (validation 0.46 >= --target-accuracy 0.42)
    c.warm_start.min_lr_ratio = 0.02
    c.warm_start.micro_batches = 16  # on a CPU, attention over 2 rows at a time stays in cache
    c.data.system_prompt = ""  # no system message: the task needs none, and every token is trained on
    c.data.max_prompt_len = 48
    c.rollout.max_completion_len = 256
    c.cache.init = "solutions"
    c.cache.max_truncation = 20
    # 1e-4 (the toy's) rose for 10-20 steps and fell back (0.496 at step 60); 3e-5 held its rise (0.520, docs)
    c.optim.learning_rate = 3e-5
    c.optim.micro_batches = 16  # 6 rows at a time: the same update, 2-3x faster on a CPU (attention in cache)
    c.train.checkpoint_every = 50
    c.eval.every = 20
    c.eval.max_new_tokens = 256
    return c
