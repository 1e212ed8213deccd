"""Weights stored quantised (QLoRA's frozen base, `lora.base_dtype` int8 / int4): symmetric absmax per output
channel. A weight W [*lead, *in, *out] is kept as q = round(W / s) in int8 / int4 with s = max|W| over its input axes
/ qmax (shape [*lead, 1.., *out], float32, the variable `X_qscale` next to the weight `X`); the layers read
q · s in the compute dtype (`read`), one layer at a time, so the bf16 copy of a weight lives only while its layer
runs. Error per element at most s / 2 (round to nearest).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

QMAX = {"int8": 127, "int4": 7}  # the symmetric range of each storage dtype
SCALE_SUFFIX = "_qscale"


class Scale(nnx.Param):
  """The float32 per-channel scale of a quantised weight (frozen with it; never cast to the base's dtype)."""


def quantize(w: jax.Array, in_axes: tuple[int, ...], dtype: str) -> tuple[jax.Array, jax.Array]:
  """(q, s) of `w` with one scale per output channel (max over `in_axes`, kept as size-1 axes)."""
  w32 = w.astype(jnp.float32)
  s = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True) / QMAX[dtype]
  s = jnp.where(s > 0, s, 1.0)
  q = jnp.clip(jnp.round(w32 / s), -QMAX[dtype], QMAX[dtype]).astype(dtype)
  return q, s


def dequantize(q: jax.Array, s: jax.Array, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * s).astype(dtype)


def read(module: nnx.Module, name: str, dtype) -> jax.Array:
  """The module's weight `name` in `dtype`: dequantised when stored quantised (it has `name + SCALE_SUFFIX`)."""
  w = getattr(module, name)[...]
  scale = getattr(module, name + SCALE_SUFFIX, None)
  return w.astype(dtype) if scale is None else dequantize(w, scale[...], dtype)


def store(module: nnx.Module, name: str, in_axes: tuple[int, ...], dtype: str) -> None:
  """Replace the module's weight `name` by its quantised form and add its `Scale` (the weight's logical axes, None on
  the input axes), in place."""
  var = getattr(module, name)
  axes = var.get_metadata().get("axes") or (None,) * var.ndim
  q, s = jax.jit(quantize, static_argnums=(1, 2))(var[...], in_axes, dtype)
  setattr(module, name, nnx.Param(q, axes=axes))
  setattr(module, name + SCALE_SUFFIX, Scale(s, axes=tuple(None if i in in_axes else a
                                                                   for i, a in enumerate(axes))))
