"""Per-token statistics of the next-token distribution, computed without ever holding [B, T, V] logits.

`token_stats(model, batch, chunk=..., want=...)` is the one interface every loss uses; it returns float32 [B, T]
arrays for the requested statistics (logits = softcap(h @ w) / temperature, p = softmax(logits)):
  logp     log p(target)
  lse      logsumexp(logits)                    (z-loss)
  lse2     log Σ_v p(v)²                        (WPO's weight)
  entropy  −Σ_v p(v) log p(v)
  correct  1.0 where the target's logit is the largest (ties count as correct), else 0.0 (no gradient)
`chunk` > 0: the tokens are processed `chunk` at a time under `jax.checkpoint` inside a scan, so the forward and
the backward pass hold one [chunk, V] block at a time (the last chunk padded). Under a mesh the kernel runs in a
`jax.shard_map` with the vocab split over "fsdp" and "tensor" and the hidden states of each fsdp group gathered
(`chunked_stats`): no device ever holds the whole output head (local max / sums / target pick, combined by
pmax / psum). `chunk` = 0: plain XLA on the full
logits from `model.logits` (the reference the kernel is tested against).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.models import matmul

STATS = ("logp", "lse", "lse2", "entropy", "correct")


def token_stats(model, batch: Mapping[str, jax.Array], *, chunk: int, temperature: float = 1.0,
                want: Sequence[str] = ("logp",)) -> dict[str, jax.Array]:
  """The `want`ed statistics [B, T] of `targets` after `inputs` (with the batch's positions and segment ids)."""
  unknown = sorted(set(want) - set(STATS))
  if unknown:
    raise ValueError(f"token_stats: unknown statistic(s) {unknown}; known: {STATS}")
  if chunk < 0:
    raise ValueError(f"config.loss.logprob_chunk must be >= 0 (0 = full logits), got {chunk}")
  h_BTD = model.hidden(batch["inputs"], batch.get("positions"), batch.get("segment_ids"))
  targets_BT = jnp.asarray(batch["targets"], jnp.int32)
  if chunk == 0:
    logits_BTV = model.logits(h_BTD)
    return full_stats(logits_BTV / temperature if temperature != 1.0 else logits_BTV, targets_BT, want)
  return chunked_stats(h_BTD, model.output_head(), targets_BT, softcap=model.cfg.final_logit_softcap,
                       temperature=temperature, chunk=chunk, want=tuple(want))


def full_stats(logits_BTV: jax.Array, targets_BT: jax.Array, want: Sequence[str]) -> dict[str, jax.Array]:
  """The statistics from materialised float32 logits (plain XLA; the reference for the chunked kernel)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  out = {}
  if "logp" in want:
    out["logp"] = target_logp(logits_BTV, targets_BT)
  if "lse" in want:
    out["lse"] = jax.nn.logsumexp(logits_BTV, axis=-1)
  if {"lse2", "entropy"} & set(want):
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    if "lse2" in want:
      out["lse2"] = jax.nn.logsumexp(2.0 * logp_BTV, axis=-1)
    if "entropy" in want:
      out["entropy"] = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
  if "correct" in want:
    const_BTV = jax.lax.stop_gradient(logits_BTV)
    out["correct"] = (_pick(const_BTV, targets_BT) >= jnp.max(const_BTV, axis=-1)).astype(jnp.float32)
  return out


def _pick(x_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """x at the targets [B, T] by a one-hot select (its gradient is a where, not a scatter into a zero [B, T, V])."""
  return jnp.sum(jnp.where(jnp.arange(x_BTV.shape[-1]) == targets_BT[..., None], x_BTV, 0.0), axis=-1)


@jax.custom_vjp
def target_logp(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log softmax(logits)[target] [B, T]; the backward pass is one fused [B, T, V] pass, g · (onehot − softmax)."""
  return _target_logp_fwd(logits_BTV, targets_BT)[0]


def _target_logp_fwd(logits_BTV, targets_BT):
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  return _pick(logits_BTV, targets_BT) - lse_BT, (logits_BTV, targets_BT, lse_BT)


def _target_logp_bwd(res, g_BT):
  logits_BTV, targets_BT, lse_BT = res
  hit_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
  p_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
  return g_BT[..., None] * (hit_BTV.astype(p_BTV.dtype) - p_BTV), None


target_logp.defvjp(_target_logp_fwd, _target_logp_bwd)


def chunked_stats(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, *, softcap: float | None,
                  temperature: float, chunk: int, want: tuple[str, ...]) -> dict[str, jax.Array]:
  """The statistics from hidden states and the output head, `chunk` tokens at a time.

  Under a mesh the head is never gathered: its vocab is split over "fsdp" and "tensor" (those that divide it), and
  the hidden states of the fsdp group are gathered instead (B·T·D of them per device, far fewer than the head's
  D·V at these sizes; the backward pass reduce-scatters them back), so each device computes its vocab slice of the
  logits of every token of its group, combined by pmax / psum over the vocab axes."""
  local = functools.partial(_local_stats, softcap=softcap, temperature=temperature, chunk=chunk, want=want)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(h_BTD, w_DV, targets_BT, vocab_axes=(), gather_axes=())
  bspec = sharding.batch_spec(2, mesh, h_BTD.shape[0])[0]
  batch_axes = () if bspec is None else (bspec,) if isinstance(bspec, str) else tuple(bspec)
  vocab_axes = _vocab_axes(mesh, w_DV.shape[-1])
  gather_axes = tuple(a for a in batch_axes if a in vocab_axes)
  kernel = jax.shard_map(functools.partial(local, vocab_axes=vocab_axes, gather_axes=gather_axes), mesh=mesh,
                         in_specs=(P(bspec, None, None), P(None, vocab_axes or None), P(bspec, None)),
                         out_specs=P(bspec, None))
  return kernel(h_BTD, w_DV, targets_BT)


def _vocab_axes(mesh, vocab: int) -> tuple[str, ...]:
  """The mesh axes among ("fsdp", "tensor") that split the vocab (size > 1 and dividing it)."""
  axes: list[str] = []
  for axis in ("fsdp", "tensor"):
    size = mesh.shape.get(axis, 1)
    if size > 1 and vocab % (math.prod(mesh.shape[a] for a in axes) * size) == 0:
      axes.append(axis)
  return tuple(axes)


def _local_stats(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, *, softcap: float | None,
                 temperature: float, chunk: int, want: tuple[str, ...], vocab_axes: tuple[str, ...],
                 gather_axes: tuple[str, ...]) -> dict[str, jax.Array]:
  """This device's tokens (with `gather_axes`: those of its whole group along them), flattened and split into equal
  chunks of at most `chunk` (zero-padded at the end); returns the statistics of this device's own rows."""
  b_own = h_BTD.shape[0]
  if gather_axes:
    h_BTD = jax.lax.all_gather(h_BTD, gather_axes, axis=0, tiled=True)
    targets_BT = jax.lax.all_gather(targets_BT, gather_axes, axis=0, tiled=True)
  b, t, d = h_BTD.shape
  n = b * t
  num_chunks = math.ceil(n / chunk)
  size = math.ceil(n / num_chunks)
  pad = num_chunks * size - n
  h_KCD = jnp.pad(h_BTD.reshape(n, d), ((0, pad), (0, 0))).reshape(num_chunks, size, d)
  targets_KC = jnp.pad(targets_BT.reshape(n), (0, pad)).reshape(num_chunks, size)
  block = jax.checkpoint(functools.partial(_block_stats, softcap=softcap, temperature=temperature, want=want,
                                           vocab_axes=vocab_axes), prevent_cse=False)
  # The head enters the loop in float32, so its gradient is summed over the chunks in float32, not bf16.
  w32_DV = w_DV.astype(jnp.float32)
  _, stats_K = jax.lax.scan(lambda _, x: (None, block(x[0], w32_DV, x[1])), None, (h_KCD, targets_KC))
  stats = {k: v.reshape(-1)[:n].reshape(b, t) for k, v in stats_K.items()}
  if gather_axes:
    start = jax.lax.axis_index(gather_axes) * b_own
    stats = {k: jax.lax.dynamic_slice_in_dim(v, start, b_own, axis=0) for k, v in stats.items()}
  return stats


def _block_stats(h_CD: jax.Array, w_DV: jax.Array, targets_C: jax.Array, *, softcap: float | None,
                 temperature: float, want: tuple[str, ...], vocab_axes: tuple[str, ...]) -> dict[str, jax.Array]:
  """Statistics of one chunk [C]; `w_DV` is float32 and, with `vocab_axes`, this device's slice of the vocab."""
  psum = (lambda x: jax.lax.psum(x, vocab_axes)) if vocab_axes else (lambda x: x)
  logits_CV = matmul.dot(h_CD, w_DV.astype(h_CD.dtype)).astype(jnp.float32)  # the matmul in the compute dtype, as model.logits
  if softcap is not None:
    logits_CV = jnp.tanh(logits_CV / softcap) * softcap
  if temperature != 1.0:
    logits_CV = logits_CV / temperature
  v_local = logits_CV.shape[-1]
  offset = jax.lax.axis_index(vocab_axes) * v_local if vocab_axes else 0
  max_C = jax.lax.stop_gradient(jnp.max(logits_CV, axis=-1))
  if vocab_axes:
    max_C = jax.lax.pmax(max_C, vocab_axes)
  shifted_CV = logits_CV - max_C[:, None]
  exp_CV = jnp.exp(shifted_CV)
  sum_C = psum(jnp.sum(exp_CV, axis=-1))
  lse_C = max_C + jnp.log(sum_C)
  hit_CV = jnp.arange(v_local) + offset == targets_C[:, None]
  out = {}
  if "logp" in want or "correct" in want:
    target_C = psum(jnp.sum(jnp.where(hit_CV, logits_CV, 0.0), axis=-1))
    if "logp" in want:
      out["logp"] = target_C - lse_C
    if "correct" in want:
      out["correct"] = (jax.lax.stop_gradient(target_C) >= max_C).astype(jnp.float32)
  if "lse" in want:
    out["lse"] = lse_C
  if "lse2" in want:  # log Σ p² = log Σ exp(2·(z − max)) − 2·log Σ exp(z − max)
    out["lse2"] = jnp.log(psum(jnp.sum(exp_CV * exp_CV, axis=-1))) - 2.0 * jnp.log(sum_C)
  if "entropy" in want:  # H = log Σ exp(z − max) − Σ p·(z − max)
    out["entropy"] = jnp.log(sum_C) - psum(jnp.sum(exp_CV * shifted_CV, axis=-1)) / sum_C
  return out
