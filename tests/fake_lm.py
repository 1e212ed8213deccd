"""A hand-settable stand-in for the transformer in loss tests, and a float64 numpy log-softmax reference."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


_Config = collections.namedtuple("_Config", "final_logit_softcap")


class FakeLM(nnx.Module):
  """logits of input id x = table[x]: giving every position its own id sets the logits position by position.

  It has the Transformer's loss interface: hidden states are one-hot input ids and the output head is the table."""

  def __init__(self, table_NV):
    self.table = nnx.Param(jnp.asarray(table_NV, jnp.float32))
    self.cfg = _Config(final_logit_softcap=None)

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    assert positions_BT.shape == tokens_BT.shape and segment_ids_BT.shape == tokens_BT.shape
    return jax.nn.one_hot(tokens_BT, self.table.shape[0], dtype=jnp.float32)

  def output_head(self):
    return self.table[...]

  def logits(self, h_BTN):
    return h_BTN @ self.table[...]


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
