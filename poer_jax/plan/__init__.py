"""Planning for real hardware: accelerator targets, compiled-program memory and cost, fit verdicts.

Owns: the targets (chips, topologies), compiling a run's programs for one (``build``, ``compile``), the report
and the fit verdict, the analytic projection, and ``scripts/plan.py``'s command line. The run itself is
assembled abstractly by ``poer_jax.system``, through the functions a real run calls.
May import: ``system`` and everything below it; never ``train``, ``eval`` or ``evaluate`` (its siblings).
"""

from poer_jax.plan.targets import CHIPS, TARGETS, Chip, Target, get_target, roofline_seconds
from poer_jax.program_spec import ProgramSpec

__all__ = ["ProgramSpec", "CHIPS", "TARGETS", "Chip", "Target", "get_target", "roofline_seconds"]
