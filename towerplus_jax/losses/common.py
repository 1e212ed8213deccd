"""Pieces shared by every loss: forward pass, per-token log-probs, entropy, config reading, normalisation.

Normalisation rule (all losses): a loss returns sum-over-this-micro-batch / `batch["loss_denominator"]`, the count
(tokens or sequences) of the whole global batch, so summing the micro-batch losses gives the global-batch mean.
Without `loss_denominator` the micro-batch's own count is used. Metrics follow the same rule (sums / denominator),
so they too add up across micro-batches; counts such as `ntokens` are plain sums.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from towerplus_jax import sharding

Batch = Mapping[str, jax.Array]


def read_config(cfg: ml_collections.ConfigDict | None, defaults: Mapping, loss: str) -> ml_collections.ConfigDict:
  """`defaults` overridden by the `loss` config section; unknown keys raise (the key `name` is ignored)."""
  merged = ml_collections.ConfigDict(dict(defaults))
  given = {k: v for k, v in (cfg.items() if cfg is not None else ()) if k != "name"}
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"config.loss: unknown key(s) {unknown} for loss '{loss}'; known: {sorted(defaults)}")
  merged.update(given)
  return merged


def require(batch: Batch, keys: tuple[str, ...], loss: str) -> None:
  """Raise a KeyError naming the missing batch keys."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"loss '{loss}': batch lacks {missing}; it has {sorted(batch)}")


def forward(model, batch: Batch, prefix: str = "") -> jax.Array:
  """float32 logits [B, T, V] for `{prefix}inputs` with the batch's positions and segment ids (if any)."""
  logits_BTV = model(batch[f"{prefix}inputs"], positions=batch.get(f"{prefix}positions"),
                     segment_ids=batch.get(f"{prefix}segment_ids"))
  return logits_BTV.astype(jnp.float32)


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log p(target) per position [B, T], log-softmax in float32.

  Under a mesh whose "tensor" axis splits the vocab, the vocab-parallel shard_map version runs instead: no device
  gathers the full [B, T, V] logits.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.shape.get("tensor", 1) > 1 and logits_BTV.shape[-1] % mesh.shape["tensor"] == 0:
    return sharding.vocab_parallel_logprobs(logits_BTV, targets_BT.astype(jnp.int32), mesh)
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  # A one-hot select, not take_along_axis: its gradient is a cheap where, not a scatter into a zero [B, T, V].
  hit_BTV = jnp.arange(logp_BTV.shape[-1]) == targets_BT[..., None]
  return jnp.sum(jnp.where(hit_BTV, logp_BTV, 0.0), axis=-1)


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Summed log-probs of the masked target tokens per row [B]."""
  return jnp.sum(token_logprobs(logits_BTV, targets_BT) * mask_BT, axis=-1)


def entropy(logits_BTV: jax.Array) -> jax.Array:
  """Entropy of the next-token distribution per position [B, T], in float32."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array, axis: int | None = None) -> jax.Array:
  """Mean of x over mask (0 where the mask is empty)."""
  return jnp.sum(x_BT * mask_BT, axis=axis) / jnp.maximum(jnp.sum(mask_BT, axis=axis), 1.0)


def row_mask(batch: Batch, prefix: str = "") -> jax.Array:
  """float32 [B]: 1 for rows holding a sequence, 0 for all-padding rows (segment_ids all 0)."""
  segment_ids_BT = batch.get(f"{prefix}segment_ids")
  if segment_ids_BT is None:
    return jnp.ones(batch[f"{prefix}inputs"].shape[0], jnp.float32)
  return jnp.any(segment_ids_BT > 0, axis=-1).astype(jnp.float32)


def denominator(batch: Batch, own_count: jax.Array) -> jax.Array:
  """The global `loss_denominator` when the batch carries it, else this micro-batch's count; at least 1."""
  return jnp.maximum(jnp.asarray(batch.get("loss_denominator", own_count), jnp.float32), 1.0)
