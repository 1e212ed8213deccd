"""models/matmul.dot: the plain matmul's values and gradients, a row-major weight gradient on the CPU, and a plain
matmul on other platforms."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from towerplus_jax.models import matmul

# (M, D, F): the weight gradient transposes x when D <= F, g when D > F.
SHAPES = [(96, 16, 48), (96, 48, 16), (96, 32, 32)]


def _loss(mm, x_MD, w_DF):
  return jnp.sum(jnp.sin(mm(x_MD, w_DF)).astype(jnp.float32))


def _inputs(m, d, f, dtype):
  kx, kw = jax.random.split(jax.random.key(m + d + f))
  return (jax.random.normal(kx, (m, d), jnp.float32).astype(dtype),
          jax.random.normal(kw, (d, f), jnp.float32).astype(dtype) / d ** 0.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_the_plain_matmul(shape, dtype, tol):
  x_MD, w_DF = _inputs(*shape, dtype)
  got = jax.jit(jax.value_and_grad(lambda x, w: _loss(matmul.dot, x, w), argnums=(0, 1)))(x_MD, w_DF)
  want = jax.jit(jax.value_and_grad(lambda x, w: _loss(jnp.matmul, x, w), argnums=(0, 1)))(x_MD, w_DF)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == r.dtype and g.shape == r.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("d,f", [(16, 48), (48, 16)])
def test_batched_with_an_output_dtype(d, f):
  """Leading batch dims, bfloat16 inputs and float32 results (attention's scores): as jnp.matmul's."""
  kx, kw = jax.random.split(jax.random.key(d))
  x = jax.random.normal(kx, (2, 3, 40, d)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (2, 3, d, f)).astype(jnp.bfloat16)
  def run(mm):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(mm(x, w))), argnums=(0, 1)))(x, w)
  got = run(lambda x, w: matmul.dot(x, w, jnp.float32))
  want = run(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == r.dtype and g.shape == r.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2e-2, atol=2e-2)


def _dot_dims(hlo: str) -> list[tuple[str, str]]:
  return re.findall(r"dot\([^)]*\), lhs_contracting_dims=\{(\d)\}, rhs_contracting_dims=\{(\d)\}", hlo)


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_weight_gradient_is_a_row_major_matmul(shape):
  """No dot of the compiled CPU backward contracts the rows of its left operand (XLA CPU's slow form); the plain
  matmul's backward does, which shows the check can fail."""
  x_MD, w_DF = _inputs(*shape, jnp.float32)
  def compiled(mm):
    return jax.jit(jax.grad(lambda x, w: _loss(mm, x, w), argnums=1)).lower(x_MD, w_DF).compile().as_text()
  ours, plain = _dot_dims(compiled(matmul.dot)), _dot_dims(compiled(jnp.matmul))
  assert ours and plain
  assert all(lhs == "1" for lhs, _ in ours), ours
  assert any(lhs == "0" for lhs, _ in plain), plain


def test_other_backends_trace_the_plain_matmul(monkeypatch):
  x_MD, w_DF = _inputs(*SHAPES[0], jnp.float32)
  def lowered():
    return jax.jit(jax.grad(lambda x, w: _loss(matmul.dot, x, w), argnums=(0, 1))).lower(x_MD, w_DF).as_text()
  assert "optimization_barrier" in lowered()
  for backend in ("tpu", "gpu"):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert "optimization_barrier" not in lowered()


def test_remat_policies_still_see_the_dot(capsys):
  """checkpoint_dots saves the matmul's output (the platform switch's), nothing_saveable does not."""
  m, _, f = SHAPES[0]
  x_MD, w_DF = _inputs(*SHAPES[0], jnp.float32)
  loss = lambda x, w: _loss(matmul.dot, jnp.sin(x), w)
  def saved(policy):
    print_saved_residuals(jax.checkpoint(loss, policy=policy), x_MD, w_DF)
    return capsys.readouterr().out
  assert f"f32[{m},{f}] output of" in saved(jax.checkpoint_policies.checkpoint_dots)
  assert f"f32[{m},{f}]" not in saved(jax.checkpoint_policies.nothing_saveable)


def test_matmul_2d_flattens_batch_and_time():
  x_BTD = jax.random.normal(jax.random.key(0), (2, 3, 8))
  w_DF = jax.random.normal(jax.random.key(1), (8, 5))
  np.testing.assert_allclose(matmul.matmul_2d(x_BTD, w_DF), jnp.einsum("btd,df->btf", x_BTD, w_DF), rtol=1e-5)


def test_inside_shard_map_with_operands_varying_over_different_axes():
  """x split over "a", w over "b" (as the chunked loss's hidden states and vocab slice): the custom VJP's
  cotangents vary as its inputs do, and the gradients equal the plain matmul's."""
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x_MD, w_DF = _inputs(96, 16, 48, jnp.float32)
  P = jax.sharding.PartitionSpec
  def grads(mm):
    body = lambda x, w: jax.lax.psum(_loss(mm, x, w), ("a", "b"))
    f = jax.shard_map(body, mesh=mesh, in_specs=(P("a", None), P(None, "b")), out_specs=P())
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x_MD, w_DF)
  for got, want in zip(grads(matmul.dot), grads(jnp.matmul)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_accelerator_form_traces_the_plain_matmul_on_the_cpu():
  x_MD, w_DF = _inputs(*SHAPES[0], jnp.float32)
  grad = lambda: jax.jit(jax.grad(lambda x, w: _loss(matmul.dot, x, w), argnums=1)).lower(x_MD, w_DF).as_text()
  with matmul.accelerator_form():
    inside = grad()
  assert "optimization_barrier" not in inside and "optimization_barrier" in grad()
