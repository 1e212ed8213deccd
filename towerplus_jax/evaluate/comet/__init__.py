"""COMET translation-quality estimators (RegressionMetric, UnifiedMetric) in JAX, loaded from unmodified
unbabel-comet checkpoint folders."""
from towerplus_jax.evaluate.comet.checkpoint import CometCheckpointError
from towerplus_jax.evaluate.comet.scorer import Comet, cached

__all__ = ["Comet", "CometCheckpointError", "cached"]
