"""Decoder building blocks. Every parameter carries logical axis names in its `axes` metadata.

Shape letters: B batch, T query length, S key length (cache slots), D embed, N query heads, K kv heads,
G query heads per kv head, H head dim, F mlp, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.models import attention, lora
from towerplus_jax.models.config import ModelConfig


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)), axes=axes)


class RMSNorm(nnx.Module):
  """RMSNorm in float32. Gemma scales by (1 + w) with w = 0 at init; Qwen scales by w with w = 1 at init."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.zeros if cfg.is_gemma else nnx.initializers.ones
    self.scale = _param(rngs, init, (dim,), ("norm",), cfg.param_dtype)
    self.eps, self.gemma = cfg.norm_eps, cfg.is_gemma

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    if self.gemma:
      return (normed * (1.0 + w)).astype(x.dtype)
    return w.astype(x.dtype) * normed.astype(x.dtype)


@jax.custom_vjp
def _lookup(table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """Rows of the table. Its gradient under a mesh with a data axis is each data shard's scatter-add, summed over
  "data" (a gradient reduction, as for every weight), not the scatter of every shard's activation gradients gathered
  first, which XLA chooses otherwise (between slices, activations over DCN)."""
  return jnp.take(table_VD, tokens_BT, axis=0)


def _lookup_fwd(table_VD: jax.Array, tokens_BT: jax.Array):
  return jnp.take(table_VD, tokens_BT, axis=0), (table_VD, tokens_BT)


def _lookup_bwd(res, g_BTD: jax.Array):
  table_VD, tokens_BT = res
  mesh = jax.sharding.get_abstract_mesh()
  d = 1 if mesh.empty else mesh.shape.get("data", 1)
  zeros_VD = jnp.zeros(table_VD.shape, g_BTD.dtype)
  if d == 1 or tokens_BT.shape[0] % d:
    return zeros_VD.at[tokens_BT].add(g_BTD).astype(table_VD.dtype), None
  ids_dN, g_dND = tokens_BT.reshape(d, -1), g_BTD.reshape(d, -1, g_BTD.shape[-1])
  part_dVD = jax.vmap(lambda ids_N, g_ND: zeros_VD.at[ids_N].add(g_ND))(ids_dN, g_dND)
  spec = sharding.logical_to_spec(("vocab", "embed"), table_VD.shape, mesh)
  part_dVD = jax.lax.with_sharding_constraint(part_dVD, P("data", *spec))
  return part_dVD.sum(0).astype(table_VD.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Embedder(nnx.Module):
  """Token embedding table [V, D] (also the output projection when embeddings are tied)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.table_VD = _param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.embed_dim),
                           ("vocab", "embed"), cfg.param_dtype)
    self.scale = cfg.embed_dim ** 0.5 if cfg.is_gemma else None
    self.dtype = jnp.dtype(cfg.dtype)

  def encode(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = _lookup(self.table_VD[...], tokens_BT).astype(self.dtype)
    if self.scale is not None:  # HF casts the normaliser to the activation dtype first
      x_BTD = x_BTD * jnp.asarray(self.scale, self.dtype)
    return x_BTD


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float, scale: float = 1.0) -> jax.Array:
  """Rotary embedding, rotate-half layout (as Hugging Face), computed in float32.

  x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1] as a flip of the two halves (the sign folded into the
  sin table): elementwise with an index map, which XLA fuses; building the two halves with a concatenate ran 3-4×
  slower on XLA CPU (bench/README.md). Bit-identical to HF's x1·cos − x2·sin, x2·cos + x1·sin."""
  h = x_BTNH.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angles_BTh = (positions_BT.astype(jnp.float32) / scale)[..., None] * inv_freq
  sin_BTh, cos_BTh = jnp.sin(angles_BTh), jnp.cos(angles_BTh)
  cos_BT1H = jnp.concatenate([cos_BTh, cos_BTh], axis=-1)[:, :, None, :]
  sin_BT1H = jnp.concatenate([-sin_BTh, sin_BTh], axis=-1)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  swapped = jnp.flip(x.reshape(*x.shape[:-1], 2, h // 2), axis=-2).reshape(x.shape)
  return (x * cos_BT1H + swapped * sin_BT1H).astype(x_BTNH.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with optional qkv bias, q/k norms, soft-capping and a KV cache."""

  def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
    d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init, pd = nnx.initializers.lecun_normal(), cfg.param_dtype
    self.q_DNH = _param(rngs, init, (d, n, h), ("embed", "q_heads", "head_dim"), pd)
    self.k_DKH = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_DKH = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o_NHD = _param(rngs, init, (n, h, d), ("q_heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.q_bias_NH = _param(rngs, zeros, (n, h), ("q_heads", "head_dim"), pd)
      self.k_bias_KH = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
      self.v_bias_KH = _param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg, rngs=rngs)
      self.k_norm = RMSNorm(h, cfg, rngs=rngs)
    sliding = layer_type == "sliding"
    self.window = cfg.sliding_window if sliding else None
    self.theta = (cfg.rope_local_theta or cfg.rope_theta) if sliding else cfg.rope_theta
    self.rope_scale = 1.0 if sliding else cfg.rope_scale
    self.scale = (cfg.query_pre_attn_scalar or h) ** -0.5
    self.softcap = cfg.attn_logit_softcap
    self.cfg = cfg

  def _project(self, x_BTD: jax.Array, weight: str, bias_name: str) -> jax.Array:
    y = lora.project(self, weight, "BTD,DNH->BTNH", x_BTD)
    if self.cfg.qkv_bias:
      y = y + getattr(self, bias_name)[...].astype(y.dtype)
    return y

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array | None,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    cfg = self.cfg
    q_BTNH = self._project(x_BTD, "q_DNH", "q_bias_NH")
    k_BTKH = self._project(x_BTD, "k_DKH", "k_bias_KH")
    v_BTKH = self._project(x_BTD, "v_DKH", "v_bias_KH")
    if cfg.qk_norm:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = rope(q_BTNH, positions_BT, self.theta, self.rope_scale)
    k_BTKH = rope(k_BTKH, positions_BT, self.theta, self.rope_scale)

    k_pos_BS, k_seg_BS, impl = positions_BT, segment_ids_BT, cfg.attention
    if cache is not None:  # slot s of the cache holds position s of its row
      rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
      cache = {"k": cache["k"].at[rows_B1, positions_BT].set(k_BTKH.astype(cache["k"].dtype)),
               "v": cache["v"].at[rows_B1, positions_BT].set(v_BTKH.astype(cache["v"].dtype))}
      k_BTKH, v_BTKH = cache["k"].astype(x_BTD.dtype), cache["v"].astype(x_BTD.dtype)
      k_pos_BS = jnp.broadcast_to(jnp.arange(k_BTKH.shape[1]), (x_BTD.shape[0], k_BTKH.shape[1]))
      k_seg_BS, segment_ids_BT, impl = None, None, "xla"
    out_BTNH = attention.attend(q_BTNH, k_BTKH, v_BTKH, q_positions_BT=positions_BT, k_positions_BS=k_pos_BS,
                                q_segments_BT=segment_ids_BT, k_segments_BS=k_seg_BS, window=self.window,
                                softcap=self.softcap, scale=self.scale, impl=impl, block=cfg.attention_block)
    return lora.project(self, "o_NHD", "BTNH,NHD->BTD", out_BTNH), cache


class MLP(nnx.Module):
  """Gated MLP: down(act(gate x) * up x); gelu-tanh for Gemma, SiLU (SwiGLU) for Qwen."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    init, d, f, pd = nnx.initializers.lecun_normal(), cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype
    self.gate_DF = _param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.up_DF = _param(rngs, init, (d, f), ("embed", "mlp"), pd)
    self.down_FD = _param(rngs, init, (f, d), ("mlp", "embed"), pd)
    self.gelu = cfg.is_gemma

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate_BTF = lora.project(self, "gate_DF", "BTD,DF->BTF", x_BTD)
    act_BTF = jax.nn.gelu(gate_BTF, approximate=True) if self.gelu else jax.nn.silu(gate_BTF)
    up_BTF = lora.project(self, "up_DF", "BTD,DF->BTF", x_BTD)
    return lora.project(self, "down_FD", "BTF,FD->BTD", act_BTF * up_BTF)
