"""GRPO rollouts as a batch source for the one training loop.

Each rollout: a batch of prompts, G sampled completions per prompt with the current policy (KV-cache sampler),
rewards (weighted sum of verifiable reward functions), group-normalised advantages, and training rows
prompt+completion with a completion-only loss mask. The same rollout batch is yielded `rl.iterations` (μ) times;
for μ > 1 it carries the old policy's log-probs (`old_logps`) so the clipped ratio is meaningful. As TRL and verl,
they come from a training forward pass of the policy before the rollout's first update (the loss's kernel and
temperature, the batch sharded as for training), not from the sampler (bf16 KV-cache decode differs from the full
forward); the mean gap to the sampler's is logged. The first yield is marked `old_is_current`: its old policy is the
current one, so the loss takes the current log-probs (ratio exactly 1, as with μ = 1) and not the separate pass's,
which may differ in the last bits (another compiled program).

Multi-host: every host gets the same global prompt batch; each samples and scores only the rows its devices hold
(a costly reward model runs once per row, not once per host), the completions and scores are gathered onto every
host, and group advantages (each prompt's G completions form one group of the global batch), metrics and logged
samples are computed from the global rollout, identically on every host. The sampling key of
rollout k is fold_in(key(seed + 1), k) and k is saved with the data state, so a resumed run samples as the
uninterrupted one would; a rollout batch with updates left (μ > 1) is saved in the data state too (the same on
every host), so a resume inside a rollout's μ iterations trains on the same batch.
"""
from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.data import chat
from towerplus_jax.evaluate import sampler
from towerplus_jax.files import storage
from towerplus_jax.losses import grpo
from towerplus_jax.rl import rewards


def group_advantages(rewards_N: np.ndarray, group: int, scale_std: bool = True, ddof: int = 1
                     ) -> tuple[np.ndarray, np.ndarray]:
  """A = (R - mean_group) / (std_group + 1e-4) (or no std scaling, Dr.GRPO); also each group's std.

  `ddof` = 1: the Bessel-corrected std, as TRL and Tunix (0: the population std). Unscorable completions (NaN
  reward) leave their group's mean and std and get advantage 0; a group with fewer than ddof + 1 scorable ones has
  std 0."""
  r_GN = rewards_N.reshape(-1, group).astype(np.float64)
  scored_GN = ~np.isnan(r_GN)
  n_G1 = scored_GN.sum(axis=1, keepdims=True)
  mean_G1 = np.where(scored_GN, r_GN, 0.0).sum(axis=1, keepdims=True) / np.maximum(n_G1, 1)
  sq_G1 = np.where(scored_GN, (r_GN - mean_G1) ** 2, 0.0).sum(axis=1, keepdims=True)
  std_G1 = np.where(n_G1 > ddof, np.sqrt(sq_G1 / np.maximum(n_G1 - ddof, 1)), 0.0)
  adv = np.where(scored_GN, r_GN - mean_G1, 0.0)
  if scale_std:
    adv = adv / (std_G1 + 1e-4)
  return adv.reshape(-1).astype(np.float32), std_G1[:, 0]


def training_rows(prompt_tokens_BP: np.ndarray, prompt_lengths_B: np.ndarray, completion_BC: np.ndarray,
                  completion_lengths_B: np.ndarray, logprobs_BC: np.ndarray | None, mask_rows_B: np.ndarray,
                  pad_id: int) -> dict[str, np.ndarray]:
  """prompt ⧺ completion rows (length P + C) of formats.RL (without `advantages`) with targets shifted by one and the
  loss on completion tokens only."""
  b, p = prompt_tokens_BP.shape
  c = completion_BC.shape[1]
  seq_BS = np.full((b, p + c + 1), pad_id, np.int32)
  mask_BS = np.zeros((b, p + c), np.float32)
  old_BS = np.zeros((b, p + c), np.float32)
  for i in range(b):
    lp, lc = int(prompt_lengths_B[i]), int(completion_lengths_B[i])
    seq_BS[i, :lp] = prompt_tokens_BP[i, :lp]
    seq_BS[i, lp:lp + lc] = completion_BC[i, :lc]
    mask_BS[i, lp - 1:lp - 1 + lc] = mask_rows_B[i]  # target index lp-1 predicts the first completion token
    if logprobs_BC is not None:
      old_BS[i, lp - 1:lp - 1 + lc] = logprobs_BC[i, :lc]
  lengths = prompt_lengths_B + completion_lengths_B
  idx = np.arange(p + c)
  rows = {"inputs": seq_BS[:, :-1], "targets": seq_BS[:, 1:], "loss_mask": mask_BS,
          "positions": np.broadcast_to(idx, (b, p + c)).astype(np.int32),
          "segment_ids": (idx[None, :] < lengths[:, None]).astype(np.int32)}
  if logprobs_BC is not None:
    rows["old_logps"] = old_BS
  return rows


def _encode(batch: dict[str, np.ndarray]) -> str:
  """A batch as compressed .npz bytes in base64 (exact; fits the checkpoint's JSON data state)."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **batch)
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(text: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(base64.b64decode(text))) as npz:
    return {k: npz[k] for k in npz.files}


class RolloutBatches:
  """Iterator of global GRPO training batches; get_state/set_state (prompt iterator, rollout count, a rollout batch
  with updates left) are what checkpoints save."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer, dataset, policy: Callable[[], nnx.Module],
               mesh, workdir: str):
    self.cfg, self.tokenizer, self.policy, self.mesh = config.rl, tokenizer, policy, mesh
    self.template = config.data.template
    self.data_iter = iter(dataset)
    self.reward_fn = rewards.combine([rewards.load(n, self.cfg) for n in self.cfg.rewards],
                                     list(self.cfg.reward_weights))
    self.stop_ids = tuple(chat.stop_ids(tokenizer, self.template))
    self.rng = jax.random.key(config.train.seed + 1)
    rows = self.cfg.prompts_per_step * self.cfg.num_generations
    if rows % jax.process_count():
      raise ValueError(f"rl.prompts_per_step * rl.num_generations = {rows} rollout rows cannot be shared by "
                       f"{jax.process_count()} hosts: make it a multiple of {jax.process_count()}")
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.loss_cfg = config.loss
    self._logps_fn: Callable | None = None
    self.buffer: list[dict] = []
    self._encoded: str | None = None  # the buffered batch for the data state
    self.metrics: dict[str, float] = {}
    self.rollouts = 0

  def host_metrics(self) -> dict[str, float]:
    return dict(self.metrics)

  def get_state(self) -> dict:
    """Prompt iterator, rollout count and, between a rollout's μ updates (as the loop saves: after a step), the
    rollout batch still to train on with its metrics; the same on every host (each holds the global batch)."""
    state = {"iterator": self.data_iter.get_state(), "rollouts": self.rollouts}
    if self.buffer:
      if self._encoded is None:  # once per rollout, not at every step's get_state
        self._encoded = _encode(self.buffer[0])
      state["pending"] = {"left": len(self.buffer), "batch": self._encoded, "metrics": self.metrics}
    return state

  def set_state(self, state: dict) -> None:
    self.data_iter.set_state(state["iterator"])
    self.rollouts = int(state["rollouts"])
    pending = state.get("pending")
    self.buffer = [_decode(pending["batch"])] * int(pending["left"]) if pending else []
    self._encoded = pending["batch"] if pending else None
    self.metrics = dict(pending["metrics"]) if pending else {}

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.buffer:
      batch, mu = self._rollout(), self.cfg.iterations
      self.buffer, self._encoded = [batch], None
      if mu > 1:
        later = {**self._with_training_logps(batch), "old_is_current": np.int32(0)}
        self.buffer = [later] * (mu - 1) + [{**later, "old_is_current": np.int32(1)}]
    return self.buffer.pop()

  def _with_training_logps(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` with `old_logps` from the current policy's training forward pass (jitted, no gradient, on every
    host the global [B, T] array); the sampler's log-probs it replaces give the gap metric."""
    graphdef, params = nnx.split(self.policy())
    if self._logps_fn is None:  # replicated output: every host reads the whole [B, T]
      self._logps_fn = jax.jit(lambda p, b: grpo.policy_logps(nnx.merge(graphdef, p), b, self.loss_cfg),
                               out_shardings=NamedSharding(self.mesh, P()))
    keys = ("inputs", "targets", "positions", "segment_ids")
    with jax.set_mesh(self.mesh):
      logp_BT = self._logps_fn(params, sharding.shard_global_batch({k: batch[k] for k in keys}, self.mesh))
    logp_BT = np.asarray(logp_BT, np.float32)
    on_BT = batch["loss_mask"] > 0
    gap = np.abs(logp_BT - batch["old_logps"])[on_BT]
    self.metrics["old_logps/sampler_gap_mean"] = float(gap.mean()) if gap.size else 0.0
    return {**batch, "old_logps": logp_BT}

  def _rollout(self) -> dict[str, np.ndarray]:
    cfg, g = self.cfg, self.cfg.num_generations
    prompts = next(self.data_iter)
    records = prompts["records"]
    prompt_tokens = np.repeat(prompts["prompt_tokens"], g, axis=0)
    prompt_lengths = np.repeat(prompts["prompt_lengths"], g, axis=0)
    tokens, lengths, logps, truncated = self._sample(prompt_tokens, prompt_lengths)
    texts = [self.tokenizer.decode([t for t in tokens[i, :lengths[i]] if t not in self.stop_ids])
             for i in range(len(tokens))]
    rows = [r for r in records for _ in range(g)]
    columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt"})}
    prompt_texts = [r.get("prompt", "") for r in rows]
    total, per_fn = self._score(prompt_texts, texts, columns)
    adv, group_std = group_advantages(np.asarray(total, np.float32), g, cfg.scale_rewards, cfg.std_ddof)
    keep = np.where(truncated & cfg.mask_truncated, 0.0, 1.0).astype(np.float32)
    logps = logps if cfg.iterations > 1 else None
    batch = training_rows(prompt_tokens, prompt_lengths, tokens, lengths, logps, keep, self.tokenizer.pad_id)
    batch["advantages"] = adv
    scored = total[~np.isnan(total)]
    self.metrics = {"reward/mean": float(scored.mean()) if scored.size else float("nan"),
                    "reward/std": float(scored.std()) if scored.size else float("nan"),
                    "reward/unscorable_frac": float(1.0 - scored.size / total.size),
                    "frac_reward_zero_std": float(np.mean(group_std < 1e-6)),
                    "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": float(truncated.mean()),
                    "data/dropped": float(prompts["num_dropped"])}  # prompts over max_prompt_len, this rollout
    self.metrics.update({f"reward/{k}": float(np.nanmean(v)) for k, v in per_fn.items() if np.isfinite(v).any()})
    self.metrics.update({f"time/reward_{k}": v for k, v in self.reward_fn.seconds.items()})
    self._log_samples(prompt_texts, texts, total)
    self.rollouts += 1
    return batch

  def _sample(self, prompt_tokens_RP: np.ndarray, prompt_lengths_R: np.ndarray) -> tuple[np.ndarray, ...]:
    """Completions of all R rollout rows on every host (each host samples the rows its devices hold)."""
    cfg = self.cfg
    with jax.set_mesh(self.mesh):
      out = sampler.sample_global(self.policy(), prompt_tokens_RP, prompt_lengths_R, mesh=self.mesh,
                                  max_new_tokens=cfg.max_completion_len,
                                  rng=jax.random.fold_in(self.rng, self.rollouts), temperature=cfg.temperature,
                                  top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=self.stop_ids,
                                  pad_id=self.tokenizer.pad_id)
    return out.tokens, out.lengths, out.logprobs, out.truncated

  def _score(self, prompts: list[str], completions: list[str], columns: dict[str, list]
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rewards of all rows on every host: each host scores only the rows its devices hold (a costly reward runs once
    per row, not once per host), then the hosts exchange the scores (None as NaN)."""
    rows = sharding.process_rows(self.mesh, len(completions))

    def mine(values: list) -> list:
      return [values[i] for i in rows]

    total, per_fn = self.reward_fn(mine(prompts), mine(completions), **{k: mine(v) for k, v in columns.items()})
    total, *values = sharding.gather_rows(rows, [total, *per_fn.values()])
    return total, dict(zip(per_fn, values))

  def _log_samples(self, prompts: list[str], completions: list[str], total: np.ndarray, n: int = 4) -> None:
    if jax.process_index() != 0:
      return
    storage.append_text(self.samples_path, "".join(
        json.dumps({"rollout": self.rollouts, "prompt": prompts[i], "completion": completions[i],
                    "reward": float(total[i])}, ensure_ascii=False) + "\n" for i in range(min(n, len(prompts)))))
