"""GRPO clipped policy-gradient loss with optional k3 KL to a reference policy (TRL-compatible definitions).

Batch: formats.RL, `loss_mask` on completion tokens (zero for masked truncated completions), `advantages` per row,
or its packed layout (several sequences a row, advantages per token; per-sequence sums are segment sums, so loss,
metrics and counts are the unpacked ones); optional `old_logps` (the policy before this rollout's first update, by
`policy_logps`; absent -> stop_gradient of the current log-probs, ratio exactly 1) with optional `old_is_current`
(1: the same as absent, for a rollout's first update without a second batch layout to compile), and `ref_logps`
(`reference_fn` computes them; required when beta != 0). All log-probs use logits / temperature.
Config (`loss` section; defaults and checks in config/keys.py): epsilon_low, epsilon_high, beta, temperature,
aggregation, max_completion_len (the normaliser of 'seq_mean_token_sum_norm'), logprob_chunk.
  r_t = exp(logπ − logπ_old),  ℓ_t = −min(r_t·A, clip(r_t, 1−ε_low, 1+ε_high)·A) + β·k3,
  k3 = exp(ref − logπ) − (ref − logπ) − 1.
Aggregation (loss_denominator: completion tokens of the global batch for token_mean, else its sequences):
  token_mean: Σ_tokens ℓ / denominator;  seq_mean_token_mean: Σ_seq mean_t ℓ / denominator;
  seq_mean_token_sum_norm: Σ_seq (Σ_t ℓ / max_completion_len) / denominator.
Metrics: loss, kl (when the batch has ref_logps), entropy, ratio/mean (r_t), clip_ratio/{low,high,region}_mean
(TRL's definitions). They are token means over the global batch with token_mean (sums / loss_denominator), else means of
per-sequence token means over the sequences that have loss tokens (sums / `rows_with_tokens`, the global count of
such sequences the trainer adds through `extra_counts`: masked truncated ones do not dilute them); either way they
add across micro-batches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from towerplus_jax.config import config_check, keys
from towerplus_jax.data import formats
from towerplus_jax.losses import common, logprobs, register

DEFAULTS = keys.loss_defaults("grpo")


def _config(cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The `loss` section over the defaults, checked as a run's config is (direct callers get the same lines)."""
  c = common.read_config(cfg, DEFAULTS, "grpo")
  config_check.check(ml_collections.ConfigDict({"loss": {"name": "grpo", **c}}))
  return c


def count(batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Completion tokens (token_mean) or sequences (rows that are not all padding; packed: slots holding one)."""
  if _config(cfg).aggregation == "token_mean":
    return jnp.sum(jnp.asarray(batch["loss_mask"], jnp.float32))
  return jnp.sum(_sequences(batch))


def extra_counts(batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> dict[str, jax.Array]:
  """The metrics' denominator in the seq-mean modes: sequences with at least one loss token."""
  del cfg
  mask_BT = jnp.asarray(batch["loss_mask"], jnp.float32)
  return {"rows_with_tokens": jnp.sum((_per_sequence(batch, mask_BT) > 0).astype(jnp.float32))}


def _packed(batch: common.Batch) -> bool:
  return formats.RL.layout(batch) is formats.RL.packed


def _per_sequence(batch: common.Batch, x_BT: jax.Array) -> jax.Array:
  """x summed over each sequence's tokens: [B, 1] (a row per sequence), packed [B, S] (slot s: segment s + 1)."""
  if not _packed(batch):
    return jnp.sum(x_BT, axis=-1, keepdims=True)
  num = batch["completion_index"].shape[1] + 1
  return jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num))(x_BT, batch["segment_ids"])[:, 1:]


def _sequences(batch: common.Batch) -> jax.Array:
  """float32 1 for each sequence the batch holds, 0 for padding rows and unused slots (_per_sequence's shape)."""
  if _packed(batch):
    return (jnp.asarray(batch["completion_index"]) >= 0).astype(jnp.float32)
  return common.row_mask(batch)[:, None]


def _advantages(batch: common.Batch) -> jax.Array:
  """float32 advantages broadcasting over the tokens: [B, T] as packed rows carry them, else [B, 1]."""
  adv = jnp.asarray(batch["advantages"], jnp.float32)
  return adv if _packed(batch) else adv[:, None]


def k3_kl(ref_logp_BT: jax.Array, logp_BT: jax.Array) -> jax.Array:
  """Per-token k3 estimator of KL(π || π_ref): exp(ref − logp) − (ref − logp) − 1 (>= 0, 0 when equal)."""
  delta_BT = ref_logp_BT - logp_BT
  return jnp.exp(delta_BT) - delta_BT - 1.0


def aggregate(batch: common.Batch, x_BT: jax.Array, mask_BT: jax.Array, mode: str, max_len: int,
              denom: jax.Array) -> jax.Array:
  """Sum over this micro-batch in aggregation `mode`, divided by the (global) denominator; the seq-mean modes per
  sequence of the batch (per segment on packed rows)."""
  if mode == "seq_mean_token_mean":
    per_seq = _per_sequence(batch, x_BT * mask_BT) / jnp.maximum(_per_sequence(batch, mask_BT), 1.0)
    return jnp.sum(per_seq) / denom
  total = jnp.sum(x_BT * mask_BT)
  return total / denom if mode == "token_mean" else total / max_len / denom


def policy_logps(model, batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Per-token log-probs [B, T] of `model` as the loss computes them (its kernel, logits / temperature), without
  gradient: the reference's, and with μ > 1 the old policy's (the rollout source calls it before the first update)."""
  c = _config(cfg)
  logp_BT = logprobs.token_stats(model, batch, chunk=c.logprob_chunk, temperature=c.temperature)["logp"]
  return jax.lax.stop_gradient(logp_BT)


def reference_logps(ref_model, batch: common.Batch, cfg: ml_collections.ConfigDict | None = None
                    ) -> dict[str, jax.Array]:
  """Per-token reference log-probs [B, T] (logits / temperature)."""
  return {"ref_logps": policy_logps(ref_model, batch, cfg)}


@register("grpo", batch_format="rl", count_fn=count, defaults=DEFAULTS, reference_fn=reference_logps,
          needs_reference=lambda cfg: _config(cfg).beta != 0, extra_counts=extra_counts)
def grpo_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped surrogate (PPO-style, per token) with group-relative advantages and optional k3 KL."""
  del rng
  c = _config(cfg)
  common.require(batch, formats.RL.layout(batch).required, "grpo")
  if c.beta != 0:
    common.require(batch, formats.RL.reference, "grpo with beta != 0 (add them with get('grpo').reference_fn)")
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  on_BT = mask_BT > 0
  stats = logprobs.token_stats(model, batch, chunk=c.logprob_chunk, temperature=c.temperature,
                               want=("logp", "entropy"))
  logp_BT = stats["logp"]
  old_BT = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp_BT)
  if "old_is_current" in batch:  # a rollout's first update: its old policy is the current one
    old_BT = jnp.where(batch["old_is_current"] > 0, jax.lax.stop_gradient(logp_BT), old_BT)
  ratio_BT = jnp.exp(jnp.where(on_BT, logp_BT - old_BT, 0.0))  # masked before exp: no inf/NaN from padding
  adv_BT = _advantages(batch)  # unpacked: [B, 1]
  clipped_BT = jnp.clip(ratio_BT, 1.0 - c.epsilon_low, 1.0 + c.epsilon_high)
  per_token_BT = -jnp.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
  kl_BT = None
  if "ref_logps" in batch:
    kl_BT = k3_kl(jnp.where(on_BT, batch["ref_logps"], logp_BT), logp_BT)
    if c.beta != 0:
      per_token_BT = per_token_BT + c.beta * kl_BT

  denom = common.normaliser(batch, count(batch, c))
  loss = aggregate(batch, per_token_BT, mask_BT, c.aggregation, c.max_completion_len, denom)
  metric_mode, metric_denom = "token_mean", denom
  if c.aggregation != "token_mean":
    metric_mode = "seq_mean_token_mean"
    metric_denom = common.normaliser(batch, extra_counts(batch)["rows_with_tokens"], "rows_with_tokens")
  mean = lambda x_BT: aggregate(batch, jax.lax.stop_gradient(x_BT).astype(jnp.float32), mask_BT, metric_mode,
                                c.max_completion_len, metric_denom)
  low_BT = (ratio_BT < 1.0 - c.epsilon_low) & (adv_BT < 0)
  high_BT = (ratio_BT > 1.0 + c.epsilon_high) & (adv_BT > 0)
  metrics = {
      "loss": jax.lax.stop_gradient(loss),
      "entropy": mean(stats["entropy"]),
      "ratio/mean": mean(ratio_BT),
      "clip_ratio/low_mean": mean(low_BT),
      "clip_ratio/high_mean": mean(high_BT),
      "clip_ratio/region_mean": mean(low_BT | high_BT),
  }
  if kl_BT is not None:
    metrics["kl"] = mean(kl_BT)
  return loss, metrics
