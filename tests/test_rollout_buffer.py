"""μ > 1 rollouts: old log-probs from the training forward (closed form), the replay buffer's first update marked
`old_is_current`, and a buffer with updates left restored exactly from the JSON data state."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from fake_lm import FakeLM
from test_losses_grpo import cfg, make_batch, np_logps
from towerplus_jax import sharding
from towerplus_jax.rl.replay import ReplayBuffer
from towerplus_jax.rl.rollout import Rollout, old_logps_forward


def _rollout(batch):
  n = len(batch["inputs"])
  return Rollout(batch, {"reward/mean": 0.25}, [""] * n, [""] * n, np.zeros(n, np.float32))


def test_old_logps_are_the_training_forwards():
  table, batch = make_batch()
  policy = FakeLM(table)
  forward = old_logps_forward(nnx.graphdef(policy), cfg(), sharding.make_mesh({}, jax.devices()[:1]))
  want, _ = np_logps(table, batch)
  got = forward(policy, batch)
  m = batch["loss_mask"] > 0
  np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-6)
  assert np.abs(batch["old_logps"] - want)[m].mean() > 0.1  # the test batch's "sampler" log-probs are far off


def test_the_buffer_marks_the_first_update_and_a_resume_continues_the_rollout():
  _, batch = make_batch()
  buffer = ReplayBuffer(iterations=3)
  buffer.put(_rollout(batch))
  first, second = buffer.take(), buffer.take()
  assert int(first["old_is_current"]) == 1 and int(second["old_is_current"]) == 0 and len(buffer) == 1
  np.testing.assert_array_equal(first["old_logps"], second["old_logps"])

  resumed = ReplayBuffer(iterations=3)
  resumed.set_state(json.loads(json.dumps(buffer.get_state())))  # as the checkpoint's JSON data state
  third = resumed.take()
  assert resumed.metrics == {"reward/mean": 0.25} and len(resumed) == 0 and resumed.get_state() == {}
  assert set(third) == set(second)
  for k, v in second.items():
    assert third[k].dtype == np.asarray(v).dtype, k
    np.testing.assert_array_equal(third[k], v, err_msg=k)
  with pytest.raises(IndexError, match="no updates left"):
    resumed.take()


def test_one_iteration_keeps_no_old_logps_and_no_pending_state():
  _, batch = make_batch()
  del batch["old_logps"]
  buffer = ReplayBuffer(iterations=1)
  buffer.put(_rollout(batch))
  out = buffer.take()
  assert "old_logps" not in out and "old_is_current" not in out and buffer.get_state() == {}
