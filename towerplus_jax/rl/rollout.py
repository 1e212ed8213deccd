"""One GRPO rollout, made by a pure function: `make_rollout(policy, prompts, ...) -> Rollout`.

A rollout: a batch of prompts, G sampled completions per prompt with the current policy (KV-cache sampler), rewards
(weighted sum of verifiable reward functions), group-normalised advantages, and training rows prompt+completion with
a completion-only loss mask. With μ > 1 updates per rollout (`rl.iterations`) the rows carry the old policy's
log-probs (`old_logps`): as TRL and verl, from a training forward pass of the policy before the first update (the
loss's kernel and temperature, the batch sharded as for training), not from the sampler (a bf16 KV-cache decode
differs from the full forward); the mean gap to the sampler's is a metric. replay.py holds a rollout for its μ
updates; source.py makes one whenever the buffer is empty. With data.pack the rows are packed (several prompt ⧺
completion sequences a row, formats.RL.packed) before the old log-probs' forward pass, so it too runs on fewer rows.

Multi-host: every host gets the same global prompt batch; each samples and scores only the rows its devices hold
(a costly reward model runs once per row, not once per host), the completions and scores are gathered onto every
host, and group advantages (each prompt's G completions form one group of the global batch) and metrics are computed
from the global rollout, identically on every host.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.data import packing
from towerplus_jax.evaluate import sampler
from towerplus_jax.losses import grpo

RewardFn = Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]  # rewards.combine: (prompts, completions, **cols)


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
  """The `rl` section as a rollout reads it."""
  num_generations: int
  max_completion_len: int
  temperature: float
  top_k: int
  top_p: float
  scale_rewards: bool
  std_ddof: int
  mask_truncated: bool
  iterations: int

  @classmethod
  def of(cls, rl: ml_collections.ConfigDict) -> RolloutOptions:
    return cls(**{f.name: rl[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Rollout:
  batch: dict[str, np.ndarray]  # formats.RL rows (or packed) of every completion, advantages (old_logps for μ > 1)
  metrics: dict[str, float]  # reward/*, completions/*, frac_reward_zero_std, data/dropped, old_logps gap
  prompts: list[str]  # per completion: its prompt text, completion text and total reward (for samples.jsonl)
  completions: list[str]
  rewards: np.ndarray


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


def old_logps_forward(graphdef: nnx.GraphDef, loss_cfg: ml_collections.ConfigDict, mesh: Mesh
                      ) -> Callable[[nnx.Module, dict], np.ndarray]:
  """The policy's training forward log-probs [B, T] of rollout rows (jitted once; on every host the global array)."""
  fn = jax.jit(lambda p, b: grpo.policy_logps(nnx.merge(graphdef, p), b, loss_cfg),
               out_shardings=NamedSharding(mesh, P()))
  keys = ("inputs", "targets", "positions", "segment_ids")

  def forward(policy: nnx.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    with jax.set_mesh(mesh):
      logp_BT = fn(nnx.state(policy), sharding.shard_global_batch({k: batch[k] for k in keys}, mesh))
    return np.asarray(logp_BT, np.float32)
  return forward


def make_rollout(policy: nnx.Module, prompts: dict, *, rng: jax.Array, options: RolloutOptions, reward_fn: RewardFn,
                 tokenizer, stop_ids: tuple[int, ...], mesh: Mesh,
                 old_logps: Callable[[nnx.Module, dict], np.ndarray] | None = None,
                 row_buckets: Sequence[int] = ()) -> Rollout:
  """Sample G completions of each prompt (`prompts`: a batch of the RL prompt pipeline), score them, normalise the
  rewards per group and build the training rows; `old_logps` (μ > 1) replaces the sampler's log-probs by the
  training forward's. `row_buckets` (data.pack): the rows packed (formats.RL.packed) into one of these row counts;
  empty: a row per completion."""
  g = options.num_generations
  records = prompts["records"]
  prompt_tokens = np.repeat(prompts["prompt_tokens"], g, axis=0)
  prompt_lengths = np.repeat(prompts["prompt_lengths"], g, axis=0)
  with jax.set_mesh(mesh):
    out = sampler.sample_global(policy, prompt_tokens, prompt_lengths, mesh=mesh,
                                max_new_tokens=options.max_completion_len, rng=rng, temperature=options.temperature,
                                top_k=options.top_k, top_p=options.top_p, stop_ids=stop_ids, pad_id=tokenizer.pad_id)
  tokens, lengths, truncated = out.tokens, out.lengths, out.truncated
  texts = [tokenizer.decode([t for t in tokens[i, :lengths[i]] if t not in stop_ids]) for i in range(len(tokens))]
  rows = [r for r in records for _ in range(g)]
  columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {"prompt"})}
  prompt_texts = [r.get("prompt", "") for r in rows]
  total, per_fn = _score(reward_fn, mesh, prompt_texts, texts, columns)
  adv, group_std = group_advantages(np.asarray(total, np.float32), g, options.scale_rewards, options.std_ddof)
  keep = np.where(truncated & options.mask_truncated, 0.0, 1.0).astype(np.float32)
  logps = out.logprobs if options.iterations > 1 else None
  batch = training_rows(prompt_tokens, prompt_lengths, tokens, lengths, logps, keep, tokenizer.pad_id)
  batch["advantages"] = adv
  if row_buckets:
    batch = packing.pack_sequences(batch, row_buckets, index_key="completion_index")
  scored = total[~np.isnan(total)]
  metrics = {"reward/mean": float(scored.mean()) if scored.size else float("nan"),
             "reward/std": float(scored.std()) if scored.size else float("nan"),
             "reward/unscorable_frac": float(1.0 - scored.size / total.size),
             "frac_reward_zero_std": float(np.mean(group_std < 1e-6)),
             "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
             "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.mean()),
             "data/dropped": float(prompts["num_dropped"])}  # prompts over max_prompt_len, this rollout
  metrics.update({f"reward/{k}": float(np.nanmean(v)) for k, v in per_fn.items() if np.isfinite(v).any()})
  metrics.update({f"time/reward_{k}": v for k, v in getattr(reward_fn, "seconds", {}).items()})
  if old_logps is not None:
    logp_BT = old_logps(policy, batch)
    gap = np.abs(logp_BT - batch["old_logps"])[batch["loss_mask"] > 0]
    metrics["old_logps/sampler_gap_mean"] = float(gap.mean()) if gap.size else 0.0
    batch["old_logps"] = logp_BT
  return Rollout(batch, metrics, prompt_texts, texts, total)


def _score(reward_fn: RewardFn, mesh: Mesh, prompts: list[str], completions: list[str], columns: dict[str, list]
           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Rewards of all rows on every host: each host scores only the rows its devices hold (a costly reward runs once
  per row, not once per host), then the hosts exchange the scores (None as NaN)."""
  rows = sharding.process_rows(mesh, len(completions))

  def mine(values: list) -> list:
    return [values[i] for i in rows]

  total, per_fn = reward_fn(mine(prompts), mine(completions), **{k: mine(v) for k, v in columns.items()})
  total, *values = sharding.gather_rows(rows, [total, *per_fn.values()])
  return total, dict(zip(per_fn, values))
