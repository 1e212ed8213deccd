"""Where each decoder layer's parameters live, and conversion between the unrolled and the scanned layout.

Unrolled (`scan_layers=False`): layer i is `layers.{i}`. Scanned: the layers form G = num_layers // period groups of
`period` consecutive layers (`ModelConfig.scan_period`); layer i = g * period + j is row g of the stacked Block
`stack.{j}` (every param gets a leading [G] axis, logical axis "layers"); the num_layers % period leftover layers
are unrolled as `tail.{t}`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from towerplus_jax.models.config import ModelConfig

LAYER_KEYS = ("layers", "stack", "tail")  # the top-level entries of a param dict holding decoder layers


def num_groups(cfg: ModelConfig) -> int:
  return cfg.num_layers // cfg.scan_period


def layer_slot(cfg: ModelConfig, i: int) -> tuple[str, int | None]:
  """(module path, row of the stacked axis or None) holding layer `i`: `layers.i`, `stack.j` row g or `tail.t`."""
  if not cfg.scan_layers:
    return f"layers.{i}", None
  p, g = cfg.scan_period, num_groups(cfg)
  if i < g * p:
    return f"stack.{i % p}", i // p
  return f"tail.{i - g * p}", None


def _per_layer(params: dict, cfg: ModelConfig) -> list[Any]:
  out = []
  for i in range(cfg.num_layers):
    slot, row = layer_slot(cfg, i)
    name, index = slot.split(".")
    tree = params[name][int(index)]
    out.append(tree if row is None else jax.tree.map(lambda x, r=row: x[r], tree))
  return out


def _from_layers(layers: list[Any], cfg: ModelConfig) -> dict:
  if not cfg.scan_layers:
    return {"layers": dict(enumerate(layers))}
  p, g = cfg.scan_period, num_groups(cfg)
  stack = {j: jax.tree.map(lambda *xs: jnp.stack(xs), *layers[j:g * p:p]) for j in range(p)}
  tail = layers[g * p:]  # a model without leftover layers has no `tail` entry
  return {"stack": stack, **({"tail": dict(enumerate(tail))} if tail else {})}


def same_layout(a: ModelConfig, b: ModelConfig) -> bool:
  """Whether the two configs place every layer's params alike (same scan_layers and scan_period)."""
  return a.scan_layers == b.scan_layers and a.scan_period == b.scan_period


def convert(params: dict, src: ModelConfig, dst: ModelConfig) -> dict:
  """A pure param dict (`nnx.to_pure_dict`) of a `src`-layout model in `dst`'s layout (unrolled <-> scanned)."""
  if same_layout(src, dst):
    return params
  rest = {k: v for k, v in params.items() if k not in LAYER_KEYS}
  return {**rest, **_from_layers(_per_layer(params, src), dst)}
