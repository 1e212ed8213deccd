"""A hand-settable stand-in for the transformer in loss tests, and a float64 numpy log-softmax reference."""
import jax.numpy as jnp
import numpy as np
from flax import nnx


class FakeLM(nnx.Module):
  """logits of input id x = table[x]: giving every position its own id sets the logits position by position."""

  def __init__(self, table_NV):
    self.table = nnx.Param(jnp.asarray(table_NV, jnp.float32))

  def __call__(self, tokens_BT, positions=None, segment_ids=None):
    assert positions.shape == tokens_BT.shape and segment_ids.shape == tokens_BT.shape
    return self.table[...][tokens_BT]


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
