"""Planning for real hardware: accelerator targets, compiled-program memory and cost, fit verdicts."""

from poer_jax.plan.targets import CHIPS, TARGETS, Chip, Target, get_target, roofline_seconds
from poer_jax.program_spec import ProgramSpec

__all__ = ["ProgramSpec", "CHIPS", "TARGETS", "Chip", "Target", "get_target", "roofline_seconds"]
