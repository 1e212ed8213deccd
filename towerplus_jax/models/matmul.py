"""2-D matmuls whose backward pass XLA CPU runs near its matmul peak.

`dot(x_MD, w_DF)` is `x_MD @ w_DF` everywhere. On the CPU its weight gradient `x_MDᵀ @ g_MF` (a contraction over
the M = B·T rows) is computed by first materialising the transpose of the smaller of the two operands and then
running an ordinary row-major matmul: XLA CPU's matmul kernels (YNNPACK) run the transposed-operand form at about
half their peak at these shapes (86 vs 162 GFLOP/s for [2048, 256]ᵀ @ [2048, 4096], bench/README.md), and the
optimization barriers keep XLA's algebraic simplifier from folding the transposes back into the dot. For TPU/GPU
devices (the platform of the mesh traced under, else the default backend: `sharding.platform`) the plain matmul is
traced, so those programs are unchanged, and inside `accelerator_form()` a CPU mesh traces it too (aot: an
accelerator's program estimated on fake CPU devices). The choice is
made when tracing (not by `lax.platform_dependent`, which traces both forms: ~0.4 s more per train-step trace).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from towerplus_jax import sharding


_ACCELERATOR_FORM = contextvars.ContextVar("accelerator_form", default=False)


@contextlib.contextmanager
def accelerator_form() -> Iterator[None]:
  """Within: functions traced (not ones already traced and cached) use the plain matmul on the CPU too."""
  token = _ACCELERATOR_FORM.set(True)
  try:
    yield
  finally:
    _ACCELERATOR_FORM.reset(token)


def _vma(x: jax.Array) -> frozenset[str]:
  """The `shard_map` mesh axes x varies over (none outside one)."""
  return jax.typeof(x).manual_axis_type.varying


def _vary(x: jax.Array, axes: frozenset[str]) -> jax.Array:
  """x marked varying over `axes` (inside `shard_map`); autodiff then sums its cotangent over the added ones."""
  missing = tuple(sorted(axes - _vma(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _t(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _matmul(x_MD: jax.Array, w_DF: jax.Array, out_dtype) -> jax.Array:
  return jnp.matmul(x_MD, w_DF, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_dot(x_MD: jax.Array, w_DF: jax.Array, out_dtype) -> jax.Array:
  return _matmul(x_MD, w_DF, out_dtype)


def _cpu_dot_fwd(x_MD: jax.Array, w_DF: jax.Array, out_dtype):
  return _matmul(x_MD, w_DF, out_dtype), (x_MD, w_DF)


def _cpu_dot_bwd(out_dtype, res, g_MF: jax.Array) -> tuple[jax.Array, jax.Array]:
  x_MD, w_DF = res
  barrier = jax.lax.optimization_barrier
  if w_DF.shape[-2] <= w_DF.shape[-1]:  # transpose x: [D, M] @ [M, F]
    dw_DF = barrier(barrier(_t(x_MD)) @ g_MF)
  else:  # transpose g: ([F, M] @ [M, D])ᵀ
    dw_DF = _t(barrier(barrier(_t(g_MF)) @ x_MD))
  return (g_MF @ _t(w_DF)).astype(x_MD.dtype), dw_DF.astype(w_DF.dtype)


_cpu_dot.defvjp(_cpu_dot_fwd, _cpu_dot_bwd)


def dot(x_MD: jax.Array, w_DF: jax.Array, out_dtype=None) -> jax.Array:
  """x_MD @ w_DF (leading batch dims alike; the result in `out_dtype`, else the inputs' promoted dtype), with the
  CPU-friendly weight gradient above when the program is for CPU devices."""
  if _ACCELERATOR_FORM.get() or sharding.platform() != "cpu":
    return _matmul(x_MD, w_DF, out_dtype)
  axes = _vma(x_MD) | _vma(w_DF)  # a custom VJP's cotangents must vary as its inputs do
  return _cpu_dot(_vary(x_MD, axes), _vary(w_DF, axes), out_dtype)


def matmul_2d(x_BTD: jax.Array, w_DF: jax.Array) -> jax.Array:
  """[B, T, D] @ [D, F] as one 2-D matmul: XLA (on CPU especially) then needs no transposes in the backward pass."""
  b, t, d = x_BTD.shape
  return dot(x_BTD.reshape(b * t, d), w_DF).reshape(b, t, w_DF.shape[-1])
