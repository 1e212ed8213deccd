"""Attention kernels by platform: one `attend()` over an XLA reference, Pallas splash (TPU) and cuDNN flash (GPU).

`xla` materialises float32 [B, K, G, T, S] scores: the reference, the test oracle and the KV-cache decode path.
`splash` and `cudnn` never hold the scores. They mask by token index, not by position: within one packed segment
positions advance by one per token (data/packing.py, rollout rows), so index and position differences agree there.
Rows of segment 0 (padding) attend among themselves in every implementation, never to nothing, so they stay
NaN-free; their outputs differ between implementations and are masked out of every loss.

Shape letters as in layers.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.models import matmul
from towerplus_jax.models.config import ATTENTION_IMPLS

NEG_INF = -2.3819763e38  # large finite mask value: fully masked (padding) rows stay NaN-free
_LANES = 128  # splash blocks are multiples of this


def attention_mask(q_pos_BT: jax.Array, k_pos_BS: jax.Array, window: int | None,
                   q_seg_BT: jax.Array | None = None, k_seg_BS: jax.Array | None = None) -> jax.Array:
  """[B, T, S] boolean: causal by position, same segment, and within the sliding window."""
  diff_BTS = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
  mask_BTS = diff_BTS >= 0
  if window is not None:
    mask_BTS &= diff_BTS < window
  if q_seg_BT is not None:
    mask_BTS &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
  return mask_BTS


def choose(impl: str, *, platform: str, softcap: float | None, dtype, head_dim: int,
           cudnn_max_head_dim: int = 128) -> tuple[str, str]:
  """(implementation that runs, why) for the configured `impl` on `platform` ('cpu' | 'gpu' | 'tpu')."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention={impl!r}; choose one of {ATTENTION_IMPLS}")
  if impl == "xla":
    return "xla", "model.attention='xla'"
  if impl == "splash":
    mode = "" if platform == "tpu" else f" (Pallas interpret mode on {platform})"
    return "splash", f"model.attention='splash'{mode}"
  if impl == "cudnn" or platform == "gpu":
    why = _cudnn_unsupported(platform, softcap, dtype, head_dim, cudnn_max_head_dim)
    if why:
      return "xla", f"cuDNN flash attention unavailable: {why}"
    return "cudnn", f"model.attention={impl!r} on gpu"
  if platform == "tpu":
    return "splash", "model.attention='auto' on tpu"
  return "xla", f"model.attention='auto' on {platform}"


def _cudnn_unsupported(platform: str, softcap: float | None, dtype, head_dim: int, max_head_dim: int) -> str:
  """Why cuDNN flash attention cannot run these features ('' when it can)."""
  if platform != "gpu":
    return f"platform is {platform}, not gpu"
  if softcap is not None:
    return f"it has no logit soft-capping (attn_logit_softcap={softcap})"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16/float16 activations, not {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > max_head_dim:
    return f"head_dim={head_dim} is not a multiple of 8 up to {max_head_dim}"
  return ""


@functools.cache
def _log_once(message: str) -> None:
  logging.info("attention: %s", message)


def resolve(impl: str, *, softcap: float | None, dtype, head_dim: int) -> str:
  """`choose()` for the platform of the mesh's devices (`sharding.platform`); logs the choice and its reason once."""
  platform = sharding.platform()
  max_h = 128
  if platform == "gpu":  # cuDNN takes head_dim 256 from Hopper on
    max_h = 256 if float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0 else 128
  name, why = choose(impl, platform=platform, softcap=softcap, dtype=dtype, head_dim=head_dim,
                     cudnn_max_head_dim=max_h)
  _log_once(f"{name} ({why})")
  return name


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *, q_positions_BT: jax.Array,
           k_positions_BS: jax.Array, q_segments_BT: jax.Array | None = None,
           k_segments_BS: jax.Array | None = None, window: int | None = None, softcap: float | None = None,
           scale: float, impl: str = "xla", block: int = 512) -> jax.Array:
  """Causal grouped-query attention [B, T, N, H] -> [B, T, N, H] (dtype of v).

  Masks: causal by position, within `window` by position difference, same segment; with segments also causal by
  index (positions restart per packed segment). `impl` is 'auto' or a name in ATTENTION_IMPLS; 'splash' and
  'cudnn' need self-attention (T == S, the positions of one row advancing by one per token within a segment).
  """
  name = resolve(impl, softcap=softcap, dtype=q_BTNH.dtype, head_dim=q_BTNH.shape[-1]) if impl != "xla" else "xla"
  if name == "splash":
    return _splash(q_BTNH, k_BSKH, v_BSKH, q_segments_BT, window, softcap, scale, block)
  if name == "cudnn":
    try:
      return dot_product(q_BTNH, k_BSKH, v_BSKH, q_segments_BT, window, scale, "cudnn")
    except (NotImplementedError, ValueError, RuntimeError) as e:  # cuDNN refuses at trace time: shape, version
      _log_once(f"xla (cuDNN flash attention refused these inputs: {e})")
  return _xla(q_BTNH, k_BSKH, v_BSKH, q_positions_BT, k_positions_BS, q_segments_BT, k_segments_BS, window,
              softcap, scale)


def _xla(q_BTNH, k_BSKH, v_BSKH, q_positions_BT, k_positions_BS, q_segments_BT, k_segments_BS, window, softcap,
         scale) -> jax.Array:
  """The reference: float32 scores [B, K, G, T, S], masked with NEG_INF, softmax, weighted sum of values."""
  mask_BTS = attention_mask(q_positions_BT, k_positions_BS, window, q_segments_BT, k_segments_BS)
  if q_segments_BT is not None:  # packed rows: causal by index too (positions restart per segment)
    idx_T, idx_S = jnp.arange(q_BTNH.shape[1]), jnp.arange(k_BSKH.shape[1])
    mask_BTS &= idx_T[:, None] >= idx_S[None, :]
  b, t, n, h = q_BTNH.shape
  kv, g = k_BSKH.shape[2], n // k_BSKH.shape[2]
  q_BTKGH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).reshape(b, t, kv, g, h)
  logits_BKGTS = matmul.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, jnp.float32)
  if softcap is not None:
    logits_BKGTS = jnp.tanh(logits_BKGTS / softcap) * softcap
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, NEG_INF)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  return matmul.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH).reshape(b, t, n, h)


def dot_product(q_BTNH, k_BTKH, v_BTKH, segments_BT, window, scale, implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` with our masks ('cudnn' in production; 'xla' checks the mapping on CPU).

  Packed segments become a boolean [B, 1, T, T] mask (cuDNN turns it into a bias: per row, not per head)."""
  mask_B1TS = None
  if segments_BT is not None:
    mask_B1TS = segments_BT[:, None, :, None] == segments_BT[:, None, None, :]
  local = None if window is None else (window - 1, 0)
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=mask_B1TS, scale=scale, is_causal=True,
                                      local_window_size=local, implementation=implementation)


def _splash(q_BTNH, k_BTKH, v_BTKH, segments_BT, window, softcap, scale, block) -> jax.Array:
  """Pallas splash attention, vmapped over rows; under a mesh, shard_map over batch (and heads over "tensor")."""
  b, t, n, h = q_BTNH.shape
  blk = min(block, -(-t // _LANES) * _LANES)
  pad = -t % blk  # a padded tail is invisible to real queries (causal); its outputs are dropped
  q_BNTH = _pad_t(q_BTNH * jnp.asarray(scale, q_BTNH.dtype), pad).transpose(0, 2, 1, 3)
  k_BKTH, v_BKTH = (_pad_t(x, pad).transpose(0, 2, 1, 3) for x in (k_BTKH, v_BTKH))
  seg_BT = None if segments_BT is None else _pad_t(segments_BT, pad)
  interpret = sharding.platform() != "tpu"

  def rows(q_BNTH, k_BKTH, v_BKTH, seg_BT):
    kernel = _kernel(q_BNTH.shape[1], t + pad, window, softcap, blk, interpret)
    if seg_BT is None:
      return jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q_BNTH, k_BKTH, v_BKTH, seg_BT)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    q_spec, k_spec = _specs(mesh, q_BNTH.shape, k_BKTH.shape)
    seg_spec = None if seg_BT is None else P(q_spec[0], None)
    rows = jax.shard_map(rows, in_specs=(q_spec, k_spec, k_spec, seg_spec), out_specs=q_spec, check_vma=False)
  out_BNTH = rows(q_BNTH, k_BKTH, v_BKTH, seg_BT)
  return out_BNTH.transpose(0, 2, 1, 3)[:, :t].astype(v_BTKH.dtype)


def _pad_t(x_BT: jax.Array, pad: int) -> jax.Array:
  """Zero-pad axis 1 (time) by `pad` (segment id 0 = padding for segment ids)."""
  return jnp.pad(x_BT, [(0, 0), (0, pad)] + [(0, 0)] * (x_BT.ndim - 2)) if pad else x_BT


def _specs(mesh, q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> tuple[P, P]:
  """Batch over the batch mesh axes; heads over "tensor" only when it splits query and kv heads alike."""
  q_spec = sharding.logical_to_spec(("batch", "q_heads", None, None), q_shape, mesh)
  k_spec = sharding.logical_to_spec(("batch", "kv_heads", None, None), k_shape, mesh)
  if q_spec[1] != k_spec[1]:
    q_spec = k_spec = P(q_spec[0], None, None, None)
  return q_spec, k_spec


def _kernel(num_heads: int, t: int, window: int | None, softcap: float | None, blk: int, interpret: bool):
  """A splash kernel for [N, T, H] queries and [K, T, H] keys: causal, optionally within `window` tokens.

  Built per trace (its mask tables become constants of that trace); splash caches the mask processing itself."""
  mask = splash.CausalMask((t, t)) if window is None else splash.LocalMask((t, t), (window - 1, 0), 0)
  sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                            block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  return splash.make_splash_mha(splash.MultiHeadMask([mask] * num_heads), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)
