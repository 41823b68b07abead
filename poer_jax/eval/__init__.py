"""Evaluation: avg@k / pass@k of a policy on a set of problems (``evaluator``, ``passk``), paired tests between
two evaluations (``paired``), and the prompt and sampling settings saved with an export (``settings``).

Owns: what an evaluation measures and how two are compared. Answer grading is ``poer_jax.rewards``'s, the
command line ``poer_jax.evaluate``'s.
May import: ``system`` and everything below it; never ``train``, ``plan`` or ``evaluate`` (the run and the
command line use it, not the other way round).
"""
