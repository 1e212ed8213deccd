"""GRPO's batch source for the one training loop: a rollout (rollout.py) whenever the replay buffer (replay.py) is
empty, made with the policy the loop hands over, then its μ updates.

The data state a checkpoint saves: the prompt iterator, the rollout count k and the buffer. The sampling key of
rollout k is fold_in(key(seed + 1), k), so a resumed run samples as the uninterrupted one would. Process 0 appends a
few samples of each rollout to WORKDIR/samples.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.data import chat, packing
from towerplus_jax.files import storage
from towerplus_jax.rl import rewards
from towerplus_jax.rl.replay import ReplayBuffer
from towerplus_jax.rl.rollout import Rollout, RolloutOptions, make_rollout, old_logps_forward


class RolloutSource:
  def __init__(self, config: ml_collections.ConfigDict, tokenizer, prompts, mesh: Mesh, workdir: str):
    """`prompts`: the RL prompt pipeline (a grain dataset of `rl.prompts_per_step` prompts per batch)."""
    rl = config.rl
    rows = rl.prompts_per_step * rl.num_generations
    if rows % jax.process_count():
      raise ValueError(f"rl.prompts_per_step * rl.num_generations = {rows} rollout rows cannot be shared by "
                       f"{jax.process_count()} hosts: make it a multiple of {jax.process_count()}")
    self.options, self.tokenizer, self.mesh, self.loss_cfg = RolloutOptions.of(rl), tokenizer, mesh, config.loss
    self.prompts = iter(prompts)
    self.reward_fn = rewards.combine([rewards.load(n, rl) for n in rl.rewards], list(rl.reward_weights))
    self.stop_ids = tuple(chat.stop_ids(tokenizer, config.data.template))
    self.rng = jax.random.key(config.train.seed + 1)
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.buffer = ReplayBuffer(rl.iterations)
    # data.pack: packed rows in multiples of the devices the batch is split over times train.micro_batches (each
    # micro-batch split evenly), the same on every host since every host holds the global rollout.
    multiple = math.prod(mesh.shape[a] for a in sharding.BATCH) * config.train.micro_batches
    self.row_buckets = packing.sequence_buckets(rows, multiple) if config.data.pack else ()
    self.rollouts = 0
    self._old_logps: Callable | None = None

  def next(self, policy: Callable[[], nnx.Module]) -> dict[str, np.ndarray]:
    if not len(self.buffer):
      rollout = self._rollout(policy())
      self.buffer.put(rollout)
      self._log_samples(rollout)
      self.rollouts += 1
    return self.buffer.take()

  def _rollout(self, policy: nnx.Module) -> Rollout:
    if self.options.iterations > 1 and self._old_logps is None:
      self._old_logps = old_logps_forward(nnx.graphdef(policy), self.loss_cfg, self.mesh)
    return make_rollout(policy, next(self.prompts), rng=jax.random.fold_in(self.rng, self.rollouts),
                        options=self.options, reward_fn=self.reward_fn, tokenizer=self.tokenizer,
                        stop_ids=self.stop_ids, mesh=self.mesh, old_logps=self._old_logps,
                        row_buckets=self.row_buckets)

  def host_metrics(self) -> dict[str, float]:
    return dict(self.buffer.metrics)

  def get_state(self) -> dict:
    state = {"iterator": self.prompts.get_state(), "rollouts": self.rollouts}
    pending = self.buffer.get_state()
    return {**state, "pending": pending} if pending else state

  def set_state(self, state: dict) -> None:
    self.prompts.set_state(state["iterator"])
    self.rollouts = int(state["rollouts"])
    self.buffer.set_state(state.get("pending", {}))

  def _log_samples(self, rollout: Rollout, n: int = 4) -> None:
    if jax.process_index() != 0:
      return
    storage.append_text(self.samples_path, "".join(
        json.dumps({"rollout": self.rollouts, "prompt": rollout.prompts[i], "completion": rollout.completions[i],
                    "reward": float(rollout.rewards[i])}, ensure_ascii=False) + "\n"
        for i in range(min(n, len(rollout.prompts)))))
