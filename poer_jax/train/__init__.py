"""Training: the POER / GRPO loop (``loop.PoerTrainer``, paper Algorithm 1) and the run's I/O.

Owns: the loop and its steps (rollout, rewards, advantages, updates, cache updates, held-out evaluation), the
data order (``iterator``), the reward worker pool and what it returns (``reward_pool``, ``reward_result``,
``reward_setup``), checkpoints, metrics and progress, the run directory and its rules (``run_dir``), the run's
report and export, and the command line (``python -m poer_jax.train``). What a run is built from is assembled by
``poer_jax.system``.
May import: ``system`` and everything below it, and ``eval`` (its sibling: held-out evaluation, paired tests,
eval settings); never ``plan`` or ``evaluate`` (tests/test_layers.py).
"""
