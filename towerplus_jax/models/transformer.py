"""One decoder for Gemma 2, Gemma 3 (text), Qwen 2/2.5 and Qwen 3, driven by `ModelConfig` flags.

With `scan_layers` the layers run as one `lax.scan` over stacked groups of `scan_period` blocks (models/layout.py);
each position in a group keeps its own static attention window, and leftover layers run unrolled after the scan.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from towerplus_jax import sharding
from towerplus_jax.models import layout, matmul
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.layers import MLP, Attention, Embedder, RMSNorm

# Mirrors the block tree: cache[name][k] belongs to getattr(model, name)[k] for name in "layers" (unrolled model)
# or "stack" / "tail" (scanned model); each {"k": [B, S, K, H], "v": ...}, with a leading [G] axis under "stack".
Cache = dict[str, list[dict[str, jax.Array]]]
BLOCK_INPUT = "block_input"  # checkpoint_name of each block's (scanned group's) input: what `offload` moves to host
ACTIVATION_AXES = ("batch", None, None)  # logical axes of x_BTD between blocks (batch split, the rest whole)

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[BLOCK_INPUT], offload_src="device",
        offload_dst="pinned_host"),
}


class Block(nnx.Module):
  """Pre-norm residual block; Gemma adds post-norms ("sandwich") around attention and MLP."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.pre_attn_norm = RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
    self.attn = Attention(cfg, cfg.layer_type(layer), rngs=rngs)
    self.pre_mlp_norm = RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.is_gemma:
      self.post_attn_norm = RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
      self.post_mlp_norm = RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
    self.sandwich = cfg.is_gemma

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    y_BTD, cache = self.attn(self.pre_attn_norm(x_BTD), positions_BT, segment_ids_BT, cache)
    if self.sandwich:
      y_BTD = self.post_attn_norm(y_BTD)
    x_BTD = x_BTD + y_BTD
    y_BTD = self.mlp(self.pre_mlp_norm(x_BTD))
    if self.sandwich:
      y_BTD = self.post_mlp_norm(y_BTD)
    return x_BTD + y_BTD, cache


def _run_blocks(blocks: Sequence[Block], x_BTD: jax.Array, positions_BT: jax.Array,
                segment_ids_BT: jax.Array | None, caches: Sequence[dict] | None = None) -> tuple[jax.Array, list]:
  """Blocks in order (one block, or a scanned group), the residual stream constrained to a batch split."""
  x_BTD = checkpoint_name(sharding.constrain(x_BTD, ACTIVATION_AXES), BLOCK_INPUT)
  new_caches = []
  for k, block in enumerate(blocks):
    x_BTD, cache = block(x_BTD, positions_BT, segment_ids_BT, None if caches is None else caches[k])
    x_BTD = sharding.constrain(x_BTD, ACTIVATION_AXES)
    new_caches.append(cache)
  return x_BTD, new_caches


def _block_forward(block: Block, x_BTD, positions_BT, segment_ids_BT):
  return _run_blocks([block], x_BTD, positions_BT, segment_ids_BT)[0]


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.List:
  """`scan_period` Blocks whose params are stacked over the G groups (leading logical axis "layers")."""
  groups = layout.num_groups(cfg)

  @nnx.split_rngs(splits=groups)
  @nnx.vmap(in_axes=0, out_axes=0, axis_size=groups)
  def make(rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([Block(cfg, j, rngs=rngs) for j in range(cfg.scan_period)])

  stack = make(rngs)
  for _, var in nnx.iter_graph(stack):
    if isinstance(var, nnx.Param):
      var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
  return stack


class Transformer(nnx.Module):
  """Decoder-only language model returning float32 logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    if cfg.scan_layers:
      self.stack = _stacked_blocks(cfg, rngs)
      first = layout.num_groups(cfg) * cfg.scan_period
      self.tail = nnx.List([Block(cfg, i, rngs=rngs) for i in range(first, cfg.num_layers)])
    else:
      self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head_DV = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (cfg.embed_dim, cfg.vocab_size), jnp.dtype(cfg.param_dtype)),
          axes=("embed", "vocab"))

  @property
  def _unrolled(self) -> str:
    """Attribute name of the blocks run one by one: all layers, or the scan's leftovers."""
    return "tail" if self.cfg.scan_layers else "layers"

  def __call__(self, tokens_BT: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Full forward pass. `segment_ids` (0 = padding) keep packed documents apart; positions restart per segment."""
    return self.logits(self.hidden(tokens_BT, positions, segment_ids))

  def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
             segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, D] (compute dtype): what the output head turns into logits.

    Losses that must never hold [B, T, V] logits take these plus `output_head()` (see losses/logprobs.py)."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    block_fn = _block_forward
    if self.cfg.remat != "none":
      block_fn = nnx.remat(_block_forward, policy=_REMAT[self.cfg.remat])
    x_BTD = self.embedder.encode(tokens_BT)
    if self.cfg.scan_layers:
      x_BTD, _ = self._scan(x_BTD, positions_BT, segment_ids_BT)
    for block in getattr(self, self._unrolled):
      x_BTD = block_fn(block, x_BTD, positions_BT, segment_ids_BT)
    return self.final_norm(x_BTD)

  def _scan(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
            cache: list[dict] | None = None) -> tuple[jax.Array, list[dict] | None]:
    """The stacked groups by `lax.scan` (remat policy inside the body when training, i.e. without a cache)."""
    graphdef, params = nnx.split(self.stack)

    def body(x_BTD, xs):
      group_params, group_cache = xs
      x_BTD, new_cache = _run_blocks(nnx.merge(graphdef, group_params), x_BTD, positions_BT, segment_ids_BT,
                                     group_cache)
      return x_BTD, None if group_cache is None else new_cache

    if self.cfg.remat != "none" and cache is None:
      body = jax.checkpoint(body, policy=_REMAT[self.cfg.remat], prevent_cse=False)
    return jax.lax.scan(body, x_BTD, (params, cache))

  def output_head(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the transposed embedding table when tied)."""
    dt = jnp.dtype(self.cfg.dtype)
    if self.cfg.tie_embeddings:
      return self.embedder.table_VD[...].astype(dt).T
    return self.lm_head_DV[...].astype(dt)

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] of final-normed hidden states, with Gemma's final soft-cap."""
    logits_BTV = matmul.einsum("BTD,DV->BTV", h_BTD, self.output_head()).astype(jnp.float32)
    if self.cfg.final_logit_softcap is not None:
      cap = self.cfg.final_logit_softcap
      logits_BTV = jnp.tanh(logits_BTV / cap) * cap
    return logits_BTV

  def decode(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: Cache,
             logits_at: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """Incremental step (prefill when T > 1): writes K/V at `positions_BT` (slot = position), attends to slots <= it.

    `logits_at` [B]: logits [B, 1, V] at that index of each row only, so a prefill never materialises [B, T, V].
    """
    x_BTD = self.embedder.encode(tokens_BT)
    new_cache = {}
    if self.cfg.scan_layers:
      x_BTD, new_cache["stack"] = self._scan(x_BTD, positions_BT, None, cache["stack"])
    name = self._unrolled
    x_BTD, new_cache[name] = _run_blocks(getattr(self, name), x_BTD, positions_BT, None, cache[name])
    if logits_at is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_at[:, None, None], axis=1)
    return self.logits(self.final_norm(x_BTD)), new_cache

  def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> Cache:
    shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
    dt = jnp.dtype(dtype or self.cfg.dtype)

    def layer(*lead: int) -> dict[str, jax.Array]:
      return {"k": jnp.zeros((*lead, *shape), dt), "v": jnp.zeros((*lead, *shape), dt)}

    cache = {self._unrolled: [layer() for _ in getattr(self, self._unrolled)]}
    if self.cfg.scan_layers:
      cache["stack"] = [layer(layout.num_groups(self.cfg)) for _ in range(self.cfg.scan_period)]
    return cache


def abstract_model(cfg: ModelConfig) -> Transformer:
  """A model of `cfg` as shapes and dtypes only (`nnx.eval_shape`): nothing is allocated; the target of restores,
  HF imports and compile-only checks."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
