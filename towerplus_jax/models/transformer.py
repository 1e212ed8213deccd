"""One decoder for Gemma 2, Gemma 3 (text), Qwen 2/2.5 and Qwen 3, driven by `ModelConfig` flags."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.layers import MLP, Attention, Embedder, RMSNorm, matmul_2d

Cache = list[dict[str, jax.Array]]  # per layer {"k": [B, S, K, H], "v": [B, S, K, H]}

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
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


def _block_forward(block: Block, x_BTD, positions_BT, segment_ids_BT):
  return block(x_BTD, positions_BT, segment_ids_BT)[0]


class Transformer(nnx.Module):
  """Decoder-only language model returning float32 logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head_DV = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (cfg.embed_dim, cfg.vocab_size), jnp.dtype(cfg.param_dtype)),
          axes=("embed", "vocab"))

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
    for block in self.layers:
      x_BTD = block_fn(block, x_BTD, positions_BT, segment_ids_BT)
    return self.final_norm(x_BTD)

  def output_head(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the transposed embedding table when tied)."""
    dt = jnp.dtype(self.cfg.dtype)
    if self.cfg.tie_embeddings:
      return self.embedder.table_VD[...].astype(dt).T
    return self.lm_head_DV[...].astype(dt)

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] of final-normed hidden states, with Gemma's final soft-cap."""
    logits_BTV = matmul_2d(h_BTD, self.output_head()).astype(jnp.float32)
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
    new_cache = []
    for block, layer_cache in zip(self.layers, cache):
      x_BTD, layer_cache = block(x_BTD, positions_BT, None, layer_cache)
      new_cache.append(layer_cache)
    if logits_at is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_at[:, None, None], axis=1)
    return self.logits(self.final_norm(x_BTD)), new_cache

  def init_cache(self, batch: int, max_len: int, dtype: str | None = None) -> Cache:
    shape = (batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
    dt = jnp.dtype(dtype or self.cfg.dtype)
    return [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in range(self.cfg.num_layers)]

