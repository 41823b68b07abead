"""Training: data loading and iteration, reward functions and the reward worker pool."""
