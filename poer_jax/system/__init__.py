"""The assembly layer: from a validated config to the parts of a run."""
