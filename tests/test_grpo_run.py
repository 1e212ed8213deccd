"""A tiny GRPO run with a verifiable reward (chrF of a copy task) raises the mean reward."""
import json

import numpy as np

from configs import grpo
from towerplus_jax import train


def test_grpo_raises_mean_reward_on_copy_task(tmp_path):
  c = grpo.get_config("tiny")
  c.data.train = "sample:copy"
  c.rl.update(rewards=("chrf",), reward_weights=(1.0,), max_completion_len=8, num_generations=8, prompts_per_step=4)
  c.train.update(steps=50, global_batch_size=32, log_every=1, checkpoint_every=0)
  c.loss.max_completion_length = 8
  c.optimizer.lr = 3e-3
  train.train(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  rewards = [r["reward/mean"] for r in rows]
  assert len(rewards) == 50
  assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.05, rewards
  samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  assert samples and {"prompt", "completion", "reward"} <= set(samples[0])
