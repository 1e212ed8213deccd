"""A rollout held for its μ updates (`rl.iterations`), saved and restored with the data state.

`put(rollout)` keeps its batch for μ updates; `take()` yields it μ times, the first marked `old_is_current` (its old
policy is the current one, so the loss uses the current log-probs: ratio exactly 1, as with μ = 1, not the separate
forward's, which may differ in the last bits). Between updates (where the loop saves) `get_state` holds the batch
with the updates left, exactly (compressed .npz in base64: it fits the checkpoint's JSON data state, the same on every
host), so a resume inside a rollout's μ updates trains on the same batch.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from towerplus_jax.rl.rollout import Rollout


def encode(batch: dict[str, np.ndarray]) -> str:
  """A batch as compressed .npz bytes in base64 (exact)."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **batch)
  return base64.b64encode(buf.getvalue()).decode("ascii")


def decode(text: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(base64.b64decode(text))) as npz:
    return {k: npz[k] for k in npz.files}


class ReplayBuffer:
  def __init__(self, iterations: int):
    self.iterations = iterations
    self.batch: dict[str, np.ndarray] | None = None
    self.metrics: dict[str, float] = {}  # the held rollout's
    self.left = 0
    self._encoded: str | None = None  # encoded once per rollout, not at every step's get_state

  def __len__(self) -> int:
    """Updates left on the held rollout."""
    return self.left

  def put(self, rollout: Rollout) -> None:
    self.batch, self.metrics, self.left, self._encoded = rollout.batch, dict(rollout.metrics), self.iterations, None

  def take(self) -> dict[str, np.ndarray]:
    """The held rollout's batch for its next update."""
    if not self.left:
      raise IndexError("ReplayBuffer.take: no updates left; put a rollout first")
    first = self.left == self.iterations
    self.left -= 1
    if self.iterations == 1:
      return self.batch
    return {**self.batch, "old_is_current": np.int32(first)}

  def get_state(self) -> dict:
    """{} when empty, else the batch, the updates left and the rollout's metrics."""
    if not self.left:
      return {}
    if self._encoded is None:
      self._encoded = encode(self.batch)
    return {"left": self.left, "batch": self._encoded, "metrics": self.metrics}

  def set_state(self, state: dict) -> None:
    self.left = int(state.get("left", 0))
    self._encoded = state.get("batch")
    self.batch = decode(self._encoded) if self.left else None
    self.metrics = dict(state.get("metrics", {}))
