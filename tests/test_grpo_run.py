"""A tiny GRPO run with a verifiable reward (chrF of a copy task) raises the mean reward; a resumed run samples as
the uninterrupted one."""
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import grpo
from towerplus_jax import sharding
from towerplus_jax.models import config as model_config
from towerplus_jax.run import stage
from towerplus_jax.training import weights


def test_grpo_raises_mean_reward_on_copy_task(tmp_path):
  c = grpo.get_config("tiny")
  c.data.train = "sample:copy"
  c.rl.update(rewards=("chrf",), reward_weights=(1.0,), max_completion_len=6, num_generations=8, prompts_per_step=4)
  c.train.update(steps=24, global_batch_size=32, log_every=1, checkpoint_every=0)
  c.optimizer.lr = 1e-2
  stage.train(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  rewards = [r["reward/mean"] for r in rows]
  assert len(rewards) == 24 and all(r["data/dropped"] == 0 for r in rows)  # every copy prompt fits
  assert np.mean(rewards[-6:]) > np.mean(rewards[:6]) + 0.03, rewards  # measured: 0.038 -> 0.092
  samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  assert samples and {"prompt", "completion", "reward"} <= set(samples[0])


@pytest.mark.slow
def test_resumed_grpo_samples_as_the_uninterrupted_run(tmp_path):
  """The rollout counter (hence the sampling key) and the prompt iterator come back from the checkpoint."""
  c = grpo.get_config("tiny")
  c.data.train = "sample:copy"
  c.rl.update(rewards=("chrf",), reward_weights=(1.0,), max_completion_len=8, num_generations=2, prompts_per_step=4)
  c.train.update(steps=4, global_batch_size=8, log_every=1, checkpoint_every=2, keep_checkpoints=5)
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  stage.train(c, str(full))
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  samples = [json.loads(l) for l in open(full / "samples.jsonl")]
  (resumed / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples if s["rollout"] < 2))
  stage.train(c, str(resumed))
  assert [json.loads(l) for l in open(resumed / "samples.jsonl")] == samples

  def params(workdir):
    model = weights.restore_model(model_config.load_json(str(workdir)), sharding.make_mesh({}, jax.devices()[:1]),
                                    str(workdir / "checkpoints"))
    return jax.tree.leaves(jax.device_get(nnx.to_pure_dict(nnx.state(model))))
  for x, y in zip(params(full), params(resumed)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_mu2_first_ratio_is_one_and_resumed_grpo_is_the_uninterrupted_run(tmp_path):
  """μ = 2 in bf16: the first update on each rollout has every ratio exactly 1 (old log-probs from the training
  forward pass; test_losses_grpo shows old_logps are then ignored). A run resumed at step 1, between rollout 0's two
  updates, trains on the same rollout batch, then samples rollout 1 as the uninterrupted run (rollout counter,
  hence the sampling key, and prompt iterator from the checkpoint) and ends with its parameters."""
  c = grpo.get_config("tiny")
  c.model.dtype = "bfloat16"
  c.data.train = "sample:copy"
  c.rl.update(rewards=("chrf",), reward_weights=(1.0,), max_completion_len=8, num_generations=2, prompts_per_step=4,
              iterations=2)
  c.train.update(steps=4, log_every=1, checkpoint_every=1, keep_checkpoints=5)
  c.optimizer.lr = 1e-2
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  stage.train(c, str(full))
  rows = [json.loads(l) for l in open(full / "metrics.jsonl")]
  for first, second in zip(rows[0::2], rows[1::2]):
    assert first["ratio/mean"] == 1.0 and first["clip_ratio/region_mean"] == 0.0, first
    assert np.isfinite(first["old_logps/sampler_gap_mean"]), first  # machine-dependent: 1e-3 here, 1e-7 on CI's CPU
    assert second["ratio/mean"] != 1.0, second

  shutil.copytree(full, resumed)
  for step in (2, 3, 4):
    shutil.rmtree(resumed / "checkpoints" / str(step))
  samples = [json.loads(l) for l in open(full / "samples.jsonl")]
  (resumed / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples if s["rollout"] < 1))
  stage.train(c, str(resumed))
  assert [json.loads(l) for l in open(resumed / "samples.jsonl")] == samples
  again = [json.loads(l) for l in open(resumed / "metrics.jsonl")]
  keys = [k for k in rows[1] if k.startswith(("reward/", "ratio/", "clip_ratio/", "loss", "old_logps/"))]
  assert [[r[k] for k in keys] for r in again[1:]] == [[r[k] for k in keys] for r in rows[1:]]
  read = lambda workdir: jax.tree.leaves(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "4" / "params"))
  for x, y in zip(read(full), read(resumed), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_grpo_with_the_comet_reward_runs_and_logs_it(tmp_path):
  """--config.rl.rewards='("comet",)' on the tiny COMET fixture: the reward and its time are in metrics.jsonl."""
  c = grpo.get_config("tiny")
  c.data.train = "sample:parallel"
  c.rl.update(rewards=("comet",), reward_weights=(1.0,), max_completion_len=6, num_generations=2, prompts_per_step=4,
              comet_model=os.path.join(os.path.dirname(__file__), "data", "comet", "regression"))
  c.train.update(steps=1, global_batch_size=8, log_every=1, checkpoint_every=0)
  stage.train(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 1 and all(np.isfinite(r["reward/comet"]) and r["time/reward_comet"] > 0 for r in rows)
  assert all(r["reward/mean"] == pytest.approx(r["reward/comet"]) for r in rows)
