"""Loss registry: `get(name)` -> `Loss`; losses register themselves with `@register(name, ...)`.

A loss is `fn(model, batch, rng, cfg) -> (loss, metrics)`; `cfg` is the config's `loss` section (keys absent from
it take the defaults of `default_config(name)`). The trainer puts `loss_denominator = count_fn(global_batch, cfg)`
in every micro-batch, with the loss's `extra_counts(global_batch, cfg)` (further global denominators, e.g. GRPO's
rows with loss tokens), so the micro-batch losses and metrics add up to global-batch means (see `common`).
A loss names its batch format (`data/formats.py`); when `needs_reference(cfg)` and the batch lacks the format's
`reference` fields (`reference_keys`), the trainer adds
`reference_fn(ref_model, batch, cfg)` (a frozen reference model, no gradient) to the batch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections

from towerplus_jax.data import formats

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, ml_collections.ConfigDict],
                  tuple[jax.Array, dict[str, jax.Array]]]
CountFn = Callable[[Mapping[str, jax.Array], ml_collections.ConfigDict], jax.Array]
ReferenceFn = Callable[[Any, Mapping[str, jax.Array], ml_collections.ConfigDict], dict[str, jax.Array]]
CountsFn = Callable[[Mapping[str, jax.Array], ml_collections.ConfigDict], dict[str, jax.Array]]


class Loss(NamedTuple):
  name: str
  fn: LossFn
  batch_format: formats.BatchFormat  # what its batches hold
  count_fn: CountFn  # loss tokens or sequences of a batch: the `loss_denominator` of a global batch
  defaults: Mapping[str, Any]  # every config key the loss reads, with its default
  reference_fn: ReferenceFn | None = None
  reference_keys: tuple[str, ...] = ()  # batch keys that reference_fn returns (its format's `reference`)
  needs_reference: Callable[[ml_collections.ConfigDict], bool] = lambda cfg: False
  extra_counts: CountsFn = lambda batch, cfg: {}  # further named counts of a global batch (metric denominators)


_REGISTRY: dict[str, Loss] = {}


def register(name: str, *, batch_format: str, count_fn: CountFn, defaults: Mapping[str, Any],
             reference_fn: ReferenceFn | None = None,
             needs_reference: Callable[[ml_collections.ConfigDict], bool] = lambda cfg: False,
             extra_counts: CountsFn = lambda batch, cfg: {}) -> Callable[[LossFn], LossFn]:
  """Decorator registering `fn` under `name`, reading batches of format `batch_format` (formats.FORMATS)."""
  fmt = formats.get(batch_format)

  def wrap(fn: LossFn) -> LossFn:
    if name in _REGISTRY:
      raise ValueError(f"loss '{name}' is already registered")
    reference_keys = fmt.reference if reference_fn else ()
    _REGISTRY[name] = Loss(name, fn, fmt, count_fn, dict(defaults), reference_fn, reference_keys, needs_reference,
                           extra_counts)
    return fn
  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Loss:
  if name not in _REGISTRY:
    raise ValueError(f"unknown loss '{name}'; registered: {names()}")
  return _REGISTRY[name]


def default_config(name: str) -> ml_collections.ConfigDict:
  """The `loss` config section for `name`: `name` plus every key the loss reads, at its default."""
  return ml_collections.ConfigDict({"name": name, **get(name).defaults})


def loss_denominator(name: str, batch: Mapping[str, jax.Array], cfg: ml_collections.ConfigDict | None) -> jax.Array:
  """`loss_denominator` of a (global) batch for loss `name`."""
  return get(name).count_fn(batch, cfg)


def global_counts(loss: Loss, batch: Mapping[str, jax.Array], cfg: ml_collections.ConfigDict | None
                  ) -> dict[str, jax.Array]:
  """What the trainer adds to every micro-batch of a global batch: `loss_denominator` and the loss's extra counts."""
  return {"loss_denominator": loss.count_fn(batch, cfg), **loss.extra_counts(batch, cfg)}


from towerplus_jax.losses import grpo, lm, preference  # noqa: E402,F401  (register the losses)
