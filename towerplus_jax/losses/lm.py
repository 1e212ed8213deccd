"""Next-token cross entropy over loss-mask tokens (`lm` for CPT, `sft` for instruction tuning: the same loss).

Batch: formats.LM / formats.SFT rows (the loss on `loss_mask` tokens).
Config (`loss` section; defaults and checks in config/keys.py): z_loss (weight of the auxiliary
z_loss * logsumexp(logits)^2 per loss token), logprob_chunk.
Loss = (sum of CE + z-term over loss tokens) / loss_denominator (loss tokens of the global batch).
Metrics: loss (CE only), z_loss (the added term), accuracy (argmax == target), ntokens (a sum).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from towerplus_jax.config import keys
from towerplus_jax.data import formats
from towerplus_jax.losses import common, logprobs, register

DEFAULTS = keys.loss_defaults("lm")  # lm and sft read the same keys


def count(batch: common.Batch, cfg: ml_collections.ConfigDict | None = None) -> jax.Array:
  """Number of loss tokens."""
  return jnp.sum(jnp.asarray(batch["loss_mask"], jnp.float32))


def cross_entropy_loss(model, batch: common.Batch, cfg: ml_collections.ConfigDict, name: str
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  common.require(batch, formats.LM.required, name)
  c = common.read_config(cfg, DEFAULTS, name)
  mask_BT = batch["loss_mask"].astype(jnp.float32)
  denom = common.normaliser(batch, count(batch))
  want = ("logp", "correct", "lse") if c.z_loss else ("logp", "correct")  # logsumexp² only when it is asked for
  stats = logprobs.token_stats(model, batch, chunk=c.logprob_chunk, want=want)
  ce = -jnp.sum(stats["logp"] * mask_BT) / denom
  z = jnp.zeros((), jnp.float32)
  if c.z_loss:
    z = c.z_loss * jnp.sum(stats["lse"] ** 2 * mask_BT) / denom
  correct_BT = jax.lax.stop_gradient(stats["correct"])
  metrics = {"loss": ce, "z_loss": z, "accuracy": jnp.sum(correct_BT * mask_BT) / denom,
             "ntokens": jnp.sum(mask_BT)}
  return ce + z, metrics


@register("lm", batch_format="lm", count_fn=count, defaults=DEFAULTS)
def lm_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict):
  """Token-mean cross entropy (continued pre-training)."""
  del rng
  return cross_entropy_loss(model, batch, cfg, "lm")


@register("sft", batch_format="sft", count_fn=count, defaults=DEFAULTS)
def sft_loss(model, batch: common.Batch, rng: jax.Array, cfg: ml_collections.ConfigDict):
  """Token-mean cross entropy over response tokens (supervised fine-tuning)."""
  del rng
  return cross_entropy_loss(model, batch, cfg, "sft")
