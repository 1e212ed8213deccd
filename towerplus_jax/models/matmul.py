"""The model's contractions in one place: projections, attention scores and values, the output head.

Both are XLA's own forms (`jnp.einsum`, `jnp.matmul`), the reference any kernel that replaces them must match.
The operands keep their shapes (no flattening of [B, T, D] into 2-D, no custom VJP): the TPU compiler lays the
dots out itself, and `towerplus_jax.aot` on a v5e-8 showed no memory or copy/transpose saving from the CPU-era
reshapes (bench/README.md, "CPU-only matmul forms removed").
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, x, w)`, accumulated and returned in `out_dtype` (else the inputs' promoted dtype)."""
  return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def dot(x_MD: jax.Array, w_DF: jax.Array, out_dtype=None) -> jax.Array:
  """x_MD @ w_DF (leading batch dims alike), the result in `out_dtype` (else the inputs' promoted dtype)."""
  return jnp.matmul(x_MD, w_DF, preferred_element_type=out_dtype)
