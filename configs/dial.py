"""POER in its own regime, on a built-in long-answer task with a tiny Qwen2 model, no download (work in
progress: the README's demo is still configs/toy.py).

    python scripts/warm_start.py --config=configs/dial.py   # first: the supervised warm start it starts from
    python -m poer_jax.train --config=configs/dial.py

Status: at hidden size 64 the warm start reached only ~9 % validation accuracy after 1,000 of its 4,000 steps
(about an hour on a loaded 2-core CPU); POER needs a start that is right up to the reused tail often enough
(30-60 %), so the settings below are not final.

Generates the dial task (poer_jax/tasks/dial.py: 24-32 steps of one skill, ~150-token answers, every step
deciding the answer), its character-level tokenizer and held-out set in workdir/toy, starts from the
committed supervised warm start (assets/warm_start_dial, regenerate with
``python scripts/warm_start.py --config=configs/dial.py``), then trains with POER as the paper does it:

* L = 15, about 10 % of the mean answer (the paper: L = 300 of ~2,700 tokens), the paper's continuation
  budget (up to the max completion length, the model stops at EOS);
* the cache initialised from the reference solutions (why: see the README's demo section), updated
  epsilon-greedily (epsilon 0.1) after every step; 256 training questions at 16 a step, so every question
  comes back about 6 times in 100 steps and continues its updated cached answer;
* the length-aware reward on correct answers (Eq. 10, ``correct_only``: the literal variant would score
  a wrong answer like a correct one of the group's mean length).

The held-out accuracy (128 problems, 4 samples each) is printed every 20 steps, and at the end with a paired
test against the start.
"""

from pathlib import Path

from poer_jax.train.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]


def get_config():
    c = load_config_file(Path(__file__).with_name("toy.py"))  # the demo's settings, but for the task and POER's regime
    c.workdir = "runs/dial_poer"
    c.toy.task = "dial"
    c.toy.num_train = 256
    c.toy.min_operands = 24
    c.toy.max_operands = 32
    # the warm start to commit; scripts/warm_start.py makes it with these settings (on its own training rows)
    c.warm_start.path = str(ROOT / "assets" / "warm_start_dial")
    c.warm_start.steps = 4000
    c.warm_start.micro_batches = 16  # on a CPU, attention over 2 rows at a time stays in cache
    c.data.max_prompt_len = 192
    c.rollout.max_completion_len = 192
    c.cache.init = "solutions"
    c.cache.max_truncation = 15
    c.optim.micro_batches = 16  # 6 rows at a time: the same update, 2-3x faster on a CPU (attention in cache)
    c.train.checkpoint_every = 50
    c.eval.every = 20
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 192
    return c
