"""COMET translation-quality estimators (RegressionMetric, UnifiedMetric) in JAX, loaded from unmodified
unbabel-comet checkpoint folders."""
from towerplus_jax.comet.checkpoint import CometCheckpointError
from towerplus_jax.comet.scorer import Comet, cached

__all__ = ["Comet", "CometCheckpointError", "cached"]
