"""A tiny GRPO run with a verifiable reward (chrF of a copy task) raises the mean reward."""
import json

import numpy as np

from configs import grpo
from towerplus_jax import train


def test_grpo_raises_mean_reward_on_copy_task(tmp_path):
  c = grpo.get_config("tiny")
  c.data.train = "sample:copy"
  c.rl.update(rewards=("chrf",), reward_weights=(1.0,), max_completion_len=6, num_generations=8, prompts_per_step=4)
  c.train.update(steps=24, global_batch_size=32, log_every=1, checkpoint_every=0)
  c.loss.max_completion_length = 6
  c.optimizer.lr = 1e-2
  train.train(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  rewards = [r["reward/mean"] for r in rows]
  assert len(rewards) == 24
  assert np.mean(rewards[-6:]) > np.mean(rewards[:6]) + 0.03, rewards  # measured: 0.038 -> 0.092
  samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  assert samples and {"prompt", "completion", "reward"} <= set(samples[0])
