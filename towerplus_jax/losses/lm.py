"""Next-token cross entropy over loss-mask tokens (`lm` for CPT, `sft` for instruction tuning: the same loss).

Batch: int32 [B, T] `inputs`, `targets`, `segment_ids`, `positions`; float32 [B, T] `loss_mask`.
Config (`loss` section): z_loss = 0.0 (weight of the auxiliary z_loss * logsumexp(logits)^2 per loss token).
Loss = (sum of CE + z-term over loss tokens) / loss_denominator (loss tokens of the global batch).
Metrics: loss (CE only), z_loss (the added term), accuracy (argmax == target), ntokens (a sum).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from towerplus_jax.losses import common, register

DEFAULTS = {"z_loss": 0.0}
KEYS = ("inputs", "targets", "loss_mask")


def count(batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Number of loss tokens."""
  return jnp.sum(jnp.asarray(batch["loss_mask"], jnp.float32))


def cross_entropy_loss(model, batch: common.Batch, cfg: ml_collections.ConfigDict, name: str
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  common.require(batch, KEYS, name)
  c = common.read_config(cfg, DEFAULTS, name)
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  denom = common.denominator(batch, count(batch))
  logits_BTV = common.forward(model, batch)
  logp_BT = common.token_logprobs(logits_BTV, batch["targets"])
  ce = -jnp.sum(logp_BT * mask_BT) / denom
  z = jnp.zeros((), jnp.float32)
  if c.z_loss:  # a second logsumexp pass only when it is asked for
    z = c.z_loss * jnp.sum(jax.nn.logsumexp(logits_BTV, axis=-1) ** 2 * mask_BT) / denom
  # Correct = the target's logit is the largest (ties count as correct); cheaper than argmax on XLA CPU.
  logits_BTV = jax.lax.stop_gradient(logits_BTV)
  target_BT = jnp.sum(jnp.where(jnp.arange(logits_BTV.shape[-1]) == batch["targets"][..., None], logits_BTV, 0.0), -1)
  correct_BT = (target_BT >= jnp.max(logits_BTV, axis=-1)).astype(jnp.float32)
  metrics = {"loss": ce, "z_loss": z, "accuracy": jnp.sum(correct_BT * mask_BT) / denom,
             "ntokens": jnp.sum(mask_BT)}
  return ce + z, metrics


@register("lm", count_fn=count, defaults=DEFAULTS)
def lm_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict):
  """Token-mean cross entropy (continued pre-training)."""
  del rng
  return cross_entropy_loss(model, batch, cfg, "lm")


@register("sft", count_fn=count, defaults=DEFAULTS)
def sft_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict):
  """Token-mean cross entropy over response tokens (supervised fine-tuning)."""
  del rng
  return cross_entropy_loss(model, batch, cfg, "sft")
