"""Pieces shared by every loss: config reading, normalisation.

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


def row_mask(batch: Batch, prefix: str = "") -> jax.Array:
  """float32 [B]: 1 for rows holding a sequence, 0 for all-padding rows (segment_ids all 0)."""
  segment_ids_BT = batch.get(f"{prefix}segment_ids")
  if segment_ids_BT is None:
    return jnp.ones(batch[f"{prefix}inputs"].shape[0], jnp.float32)
  return jnp.any(segment_ids_BT > 0, axis=-1).astype(jnp.float32)


def normaliser(batch: Batch, own_count: jax.Array, key: str = "loss_denominator") -> jax.Array:
  """The global count `key` (`loss_denominator` or a loss's extra count) when the batch carries it, else this
  micro-batch's own count; at least 1."""
  return jnp.maximum(jnp.asarray(batch.get(key, own_count), jnp.float32), 1.0)
