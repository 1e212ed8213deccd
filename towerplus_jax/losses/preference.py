"""Sigmoid DPO and WPO (DPO weighted by the policy's own probability of the pair, Zhou et al. 2024).

Batch: formats.PREFERENCE, a row per side (chosen, rejected) with `{side}_loss_mask` on response tokens only;
`ref_chosen_logp`, `ref_rejected_logp` (summed reference log-probs; `reference_fn` computes them when absent).
Config (`loss` section): beta = 0.1 (dpo) / 0.01 (wpo); label_smoothing = 0.0; wpo_weighting = False (dpo) /
True (wpo); logprob_chunk (see common.DEFAULTS).
  Δ = (logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l)),  L = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)
  WPO: a_t = log p(y_t) − log Σ_v p(v)², ā = mean over response tokens, w = min(exp(ā_w + ā_l), 1) under
  stop_gradient, L ← w·L.
Loss = Σ_pairs L / loss_denominator (pairs of the global batch; all-padding rows do not count).
Metrics (sums over pairs / loss_denominator): loss, rewards/{chosen,rejected,margins,accuracies} with
reward = β·(logπ − logπ_ref), logps/{chosen,rejected}, wpo/weight (1 for plain DPO).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from towerplus_jax.data import formats
from towerplus_jax.losses import common, logprobs, register

DPO_DEFAULTS = {**common.DEFAULTS, "beta": 0.1, "label_smoothing": 0.0, "wpo_weighting": False}
WPO_DEFAULTS = {**common.DEFAULTS, "beta": 0.01, "label_smoothing": 0.0, "wpo_weighting": True}


def count(batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Number of pairs (rows whose chosen segment ids are not all padding)."""
  return jnp.sum(common.row_mask(batch, "chosen_"))


def _both_sides(batch: common.Batch) -> dict[str, jax.Array]:
  """Chosen rows then rejected rows, as one [2B, T] batch (the shorter side right-padded)."""
  t = max(batch[f"{s}_inputs"].shape[1] for s in formats.SIDES)
  pad = lambda x: jnp.pad(jnp.asarray(x), ((0, 0), (0, t - x.shape[1])))
  return {f: jnp.concatenate([pad(batch[f"{s}_{f}"]) for s in formats.SIDES])
          for f in formats.ROW if f"chosen_{f}" in batch}


def _split(x_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.split(x_2B, 2)


def wpo_weight(logp_BT: jax.Array, lse2_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Per-row ā = mean_t(log p(y_t) − log Σ_v p(v)²) [B] (rows: chosen then rejected) -> w [B/2], no gradient."""
  a_BT = jax.lax.stop_gradient(logp_BT - lse2_BT)
  a_chosen, a_rejected = _split(common.masked_mean(a_BT, mask_BT, axis=-1))
  return jnp.minimum(jnp.exp(a_chosen + a_rejected), 1.0)


def reference_logps(ref_model, batch: common.Batch, cfg: ml_collections.ConfigDict | None = None
                    ) -> dict[str, jax.Array]:
  """Summed reference log-probs of the chosen and rejected responses, one forward pass."""
  chunk = common.read_config(cfg, DPO_DEFAULTS, "dpo/wpo").logprob_chunk  # dpo and wpo read the same keys
  both = _both_sides(batch)
  logp_BT = logprobs.token_stats(ref_model, both, chunk=chunk)["logp"]
  logp_B = jnp.sum(logp_BT * both["loss_mask"].astype(jnp.float32), axis=-1)
  return dict(zip(formats.PREFERENCE.reference, _split(jax.lax.stop_gradient(logp_B))))


def preference_loss(model, batch: common.Batch, cfg: ml_collections.ConfigDict, name: str, defaults: dict
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  common.require(batch, formats.PREFERENCE.required, name)
  common.require(batch, formats.PREFERENCE.reference, f"{name} (add them with get('{name}').reference_fn)")
  c = common.read_config(cfg, defaults, name)
  both = _both_sides(batch)
  mask_BT = both["loss_mask"].astype(jnp.float32)
  stats = logprobs.token_stats(model, both, chunk=c.logprob_chunk,
                               want=("logp", "lse2") if c.wpo_weighting else ("logp",))
  logp_BT = stats["logp"]
  chosen, rejected = _split(jnp.sum(logp_BT * mask_BT, axis=-1))
  chosen_ratio, rejected_ratio = chosen - batch["ref_chosen_logp"], rejected - batch["ref_rejected_logp"]
  scaled = c.beta * (chosen_ratio - rejected_ratio)
  losses = -(1.0 - c.label_smoothing) * jax.nn.log_sigmoid(scaled) - c.label_smoothing * jax.nn.log_sigmoid(-scaled)
  weight = wpo_weight(logp_BT, stats["lse2"], mask_BT) if c.wpo_weighting else jnp.ones_like(losses)
  rows = common.row_mask(batch, "chosen_")
  denom = common.denominator(batch, jnp.sum(rows))
  mean = lambda x: jnp.sum(jax.lax.stop_gradient(x) * rows) / denom
  loss = jnp.sum(weight * losses * rows) / denom
  reward_chosen, reward_rejected = c.beta * chosen_ratio, c.beta * rejected_ratio
  metrics = {
      "loss": jax.lax.stop_gradient(loss),
      "rewards/chosen": mean(reward_chosen),
      "rewards/rejected": mean(reward_rejected),
      "rewards/accuracies": mean((reward_chosen > reward_rejected).astype(jnp.float32)),
      "rewards/margins": mean(reward_chosen - reward_rejected),
      "logps/chosen": mean(chosen),
      "logps/rejected": mean(rejected),
      "wpo/weight": mean(weight),
  }
  return loss, metrics


@register("dpo", batch_format="preference", count_fn=count, defaults=DPO_DEFAULTS,
          reference_fn=reference_logps, needs_reference=lambda cfg: True)
def dpo_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict):
  """Sigmoid DPO with label smoothing."""
  del rng
  return preference_loss(model, batch, cfg, "dpo", DPO_DEFAULTS)


@register("wpo", batch_format="preference", count_fn=count, defaults=WPO_DEFAULTS,
          reference_fn=reference_logps, needs_reference=lambda cfg: True)
def wpo_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict):
  """DPO weighted by the policy's own (stop-gradient) probability of the pair."""
  del rng
  return preference_loss(model, batch, cfg, "wpo", WPO_DEFAULTS)
