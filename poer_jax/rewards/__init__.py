"""Rewards: what a completion scores. Answer extraction and grading (``answers``, math-verify), shared by the
training rewards and the evaluation, and the reward functions (``functions``: accuracy, format, cosine length,
user functions by import path, in TRL's batch signature and per item).

Owns the definition of a reward; running them in worker processes with deadlines is the run's
(``poer_jax.train.reward_pool``), checking the names a config gives is the config's (``poer_jax.system.config``).
May import: nothing of poer_jax (a core package; reward worker processes import only this).
"""
