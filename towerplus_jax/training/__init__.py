"""The training state, its step functions, the loop and what it needs (optimizer, weights, metrics)."""
