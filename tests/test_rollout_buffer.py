"""μ > 1 rollout batches: old log-probs from the training forward (closed form), the first update marked
`old_is_current`, and a rollout with updates left restored exactly from the JSON data state."""
import json

import jax
import ml_collections
import numpy as np
import pytest

from fake_lm import FakeLM
from test_losses_grpo import cfg, make_batch, np_logps
from towerplus_jax import sharding
from towerplus_jax.rl import rollout


class _Prompts:
  """The prompt iterator's state only (the rollout itself is replaced)."""

  def __init__(self):
    self.state = {"consumed": 0}

  def get_state(self):
    return dict(self.state)

  def set_state(self, state):
    self.state = dict(state)


def _source(table, batch, iterations):
  """RolloutBatches around a FakeLM policy whose `_rollout` returns `batch` (sampler log-probs as old_logps)."""
  src = object.__new__(rollout.RolloutBatches)
  src.cfg = ml_collections.ConfigDict({"iterations": iterations})
  src.loss_cfg, src.policy, src.data_iter = cfg(), lambda: FakeLM(table), _Prompts()
  src.mesh = sharding.make_mesh({}, jax.devices()[:1])
  src._logps_fn, src._encoded, src.buffer, src.metrics, src.rollouts = None, None, [], {}, 0

  def sample_once():
    if batch is None:
      raise AssertionError("a resumed source sampled a fresh rollout")
    src.metrics, src.rollouts = {"reward/mean": 0.25}, src.rollouts + 1
    return dict(batch)
  src._rollout = sample_once
  return src


def test_old_logps_come_from_the_training_forward_and_a_resume_continues_the_rollout():
  table, batch = make_batch()
  src = _source(table, batch, iterations=3)
  first, second = next(src), next(src)
  want, _ = np_logps(table, batch)
  m = batch["loss_mask"] > 0
  assert int(first["old_is_current"]) == 1 and int(second["old_is_current"]) == 0
  np.testing.assert_allclose(second["old_logps"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(first["old_logps"], second["old_logps"])
  gap = np.abs(batch["old_logps"] - want)[m].mean()
  assert gap > 0.1  # the test batch's "sampler" log-probs are far from the forward's
  np.testing.assert_allclose(src.metrics["old_logps/sampler_gap_mean"], gap, rtol=1e-4)

  state = json.loads(json.dumps(src.get_state()))  # as the checkpoint's JSON data state
  resumed = _source(table, None, iterations=3)
  resumed.set_state(state)
  third = next(resumed)
  assert resumed.rollouts == 1 and resumed.metrics == src.metrics
  assert set(third) == set(second)
  for k, v in second.items():
    assert third[k].dtype == np.asarray(v).dtype, k
    np.testing.assert_array_equal(third[k], v, err_msg=k)
  with pytest.raises(AssertionError, match="fresh rollout"):
    next(resumed)


def test_one_iteration_keeps_no_old_logps_and_no_pending_state():
  table, batch = make_batch()
  del batch["old_logps"]
  src = _source(table, batch, iterations=1)
  out = next(src)
  assert "old_logps" not in out and "old_is_current" not in out and "pending" not in src.get_state()
