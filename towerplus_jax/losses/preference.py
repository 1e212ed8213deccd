"""Sigmoid DPO and WPO (DPO weighted by the policy's own probability of the pair, Zhou et al. 2024).

Batch: formats.PREFERENCE, a row per side (chosen, rejected) with `{side}_loss_mask` on response tokens only, or its
packed layout (whole pairs sharing rows; per-pair sums are segment sums, so the loss is the unpacked one);
`ref_chosen_logp`, `ref_rejected_logp` (summed reference log-probs; `reference_fn` computes them when absent).
Config (`loss` section; defaults and checks in config/keys.py): beta, label_smoothing (ε), wpo_weighting (off
for dpo, on for wpo), logprob_chunk.
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

from towerplus_jax.config import keys
from towerplus_jax.data import formats
from towerplus_jax.losses import common, logprobs, register

DPO_DEFAULTS = keys.loss_defaults("dpo")
WPO_DEFAULTS = keys.loss_defaults("wpo")


def count(batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Number of pairs (rows whose chosen segment ids are not all padding; packed: slots holding a pair)."""
  return jnp.sum(_present(batch))


def _packed(batch: common.Batch) -> bool:
  return formats.PREFERENCE.layout(batch) is formats.PREFERENCE.packed


def _rows(batch: common.Batch) -> dict[str, jax.Array]:
  """The token rows: packed rows as they are; else chosen rows then rejected rows, as one [2B, T] batch (the shorter
  side right-padded)."""
  if _packed(batch):
    return {f: batch[f] for f in formats.ROW}
  t = max(batch[f"{s}_inputs"].shape[1] for s in formats.SIDES)
  pad = lambda x: jnp.pad(jnp.asarray(x), ((0, 0), (0, t - x.shape[1])))
  return {f: jnp.concatenate([pad(batch[f"{s}_{f}"]) for s in formats.SIDES])
          for f in formats.ROW if f"chosen_{f}" in batch}


def _pair_slots(batch: common.Batch) -> int:
  """P, the pair slots of a packed row (the shape of its per-pair fields; else all a row's segments could hold)."""
  for key in ("record_index", *formats.PREFERENCE.reference):
    if key in batch:
      return batch[key].shape[1]
  return batch["segment_ids"].shape[1] // 2


def _sides(batch: common.Batch, rows: dict[str, jax.Array], x_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x summed over each response's tokens: (chosen, rejected), each of the shape of the per-pair fields ([B]; packed
  [B, P], segment 2p+1 chosen and 2p+2 rejected of pair p)."""
  if not _packed(batch):
    return jnp.split(jnp.sum(x_BT, axis=-1), 2)
  num = 2 * _pair_slots(batch) + 1
  sums_BS = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num))(x_BT, rows["segment_ids"])
  return sums_BS[:, 1::2], sums_BS[:, 2::2]


def _present(batch: common.Batch) -> jax.Array:
  """float32 1 for each pair the batch holds, 0 for padding rows / unused slots (the shape of the per-pair fields)."""
  if not _packed(batch):
    return common.row_mask(batch, "chosen_")
  tokens_BT = (jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32)
  return (_sides(batch, batch, tokens_BT)[0] > 0).astype(jnp.float32)


def wpo_weight(batch: common.Batch, rows: dict[str, jax.Array], logp_BT: jax.Array, lse2_BT: jax.Array,
               mask_BT: jax.Array) -> jax.Array:
  """Per response ā = mean_t(log p(y_t) − log Σ_v p(v)²) -> w = min(exp(ā_w + ā_l), 1) per pair, no gradient."""
  a_BT = jax.lax.stop_gradient(logp_BT - lse2_BT)
  (a_chosen, a_rejected), (n_chosen, n_rejected) = _sides(batch, rows, a_BT * mask_BT), _sides(batch, rows, mask_BT)
  return jnp.minimum(jnp.exp(a_chosen / jnp.maximum(n_chosen, 1.0) + a_rejected / jnp.maximum(n_rejected, 1.0)), 1.0)


def reference_logps(ref_model, batch: common.Batch, cfg: ml_collections.ConfigDict | None = None
                    ) -> dict[str, jax.Array]:
  """Summed reference log-probs of the chosen and rejected responses, one forward pass."""
  chunk = common.read_config(cfg, DPO_DEFAULTS, "dpo/wpo").logprob_chunk  # dpo and wpo read the same keys
  rows = _rows(batch)
  logp_BT = logprobs.token_stats(ref_model, rows, chunk=chunk)["logp"]
  sums = _sides(batch, rows, logp_BT * rows["loss_mask"].astype(jnp.float32))
  return dict(zip(formats.PREFERENCE.reference, jax.lax.stop_gradient(sums)))


def preference_loss(model, batch: common.Batch, cfg: ml_collections.ConfigDict, name: str, defaults: dict
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  fmt = formats.PREFERENCE.layout(batch)
  common.require(batch, fmt.required, name)
  common.require(batch, fmt.reference, f"{name} (add them with get('{name}').reference_fn)")
  c = common.read_config(cfg, defaults, name)
  rows = _rows(batch)
  mask_BT = rows["loss_mask"].astype(jnp.float32)
  stats = logprobs.token_stats(model, rows, chunk=c.logprob_chunk,
                               want=("logp", "lse2") if c.wpo_weighting else ("logp",))
  logp_BT = stats["logp"]
  chosen, rejected = _sides(batch, rows, logp_BT * mask_BT)
  chosen_ratio, rejected_ratio = chosen - batch["ref_chosen_logp"], rejected - batch["ref_rejected_logp"]
  scaled = c.beta * (chosen_ratio - rejected_ratio)
  losses = -(1.0 - c.label_smoothing) * jax.nn.log_sigmoid(scaled) - c.label_smoothing * jax.nn.log_sigmoid(-scaled)
  weight = wpo_weight(batch, rows, logp_BT, stats["lse2"], mask_BT) if c.wpo_weighting else jnp.ones_like(losses)
  present = _present(batch)
  denom = common.normaliser(batch, jnp.sum(present))
  mean = lambda x: jnp.sum(jax.lax.stop_gradient(x) * present) / denom
  loss = jnp.sum(weight * losses * present) / denom
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
