"""The model's contractions in one place: projections, attention scores and values, the output head.

Both are XLA's own forms (`jnp.einsum`, `jnp.matmul`): the reference that any kernel replacing them must match.
The operands keep the model's shapes, with no flattening of [B, T, D] to 2-D and no custom VJP. The TPU compiler
lays the dots out itself. Against the CPU-era 2-D forms it estimates 6-9% fewer cycles per gemma2_2b train step, at
0-1.5% more memory per chip (bench/README.md, "CPU-only matmul forms removed").
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
