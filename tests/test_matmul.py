"""models/matmul: XLA's own contractions (values, gradients, output dtypes as jnp's), no CPU-only form, and the
remat policies still telling the projections' dots from attention's batched ones."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from towerplus_jax.models import matmul


def _inputs(x_shape, w_shape, dtype):
  kx, kw = jax.random.split(jax.random.key(sum(x_shape) + sum(w_shape)))
  return (jax.random.normal(kx, x_shape, jnp.float32).astype(dtype),
          (jax.random.normal(kw, w_shape, jnp.float32) / w_shape[-2] ** 0.5).astype(dtype))


def _value_and_grads(fn, x, w):
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w)).astype(jnp.float32)), argnums=(0, 1)))(x, w)


def _assert_close(got, want, tol):
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == r.dtype and g.shape == r.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)


# (spec, x shape, w shape): the model's projections, output head, attention scores and values.
EINSUMS = [("BTD,DF->BTF", (2, 24, 16), (16, 40)),
           ("BTD,DNH->BTNH", (2, 24, 16), (16, 4, 8)),
           ("BTNH,NHD->BTD", (2, 24, 4, 8), (4, 8, 16)),
           ("BTKGH,BSKH->BKGTS", (2, 24, 2, 3, 8), (2, 24, 2, 8)),
           ("BKGTS,BSKH->BTKGH", (2, 2, 3, 24, 24), (2, 24, 2, 8))]


@pytest.mark.parametrize("spec,x_shape,w_shape", EINSUMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_einsum_values_and_gradients_are_jnps(spec, x_shape, w_shape, dtype, tol):
  x, w = _inputs(x_shape, w_shape, dtype)
  _assert_close(_value_and_grads(lambda x, w: matmul.einsum(spec, x, w), x, w),
                _value_and_grads(lambda x, w: jnp.einsum(spec, x, w), x, w), tol)


@pytest.mark.parametrize("x_shape,w_shape", [((40, 16), (16, 48)), ((2, 3, 40, 16), (2, 3, 16, 8))])
def test_dot_in_an_output_dtype(x_shape, w_shape):
  """bfloat16 operands, float32 results (attention's scores, the chunked head): jnp.matmul's values; the gradients
  come back in the operands' dtype."""
  x, w = _inputs(x_shape, w_shape, jnp.bfloat16)
  got = _value_and_grads(lambda x, w: matmul.dot(x, w, jnp.float32), x, w)
  want = _value_and_grads(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32), x, w)
  _assert_close(got, want, 2e-2)
  assert matmul.dot(x, w, jnp.float32).dtype == jnp.float32 and got[1][1].dtype == jnp.bfloat16
  assert matmul.einsum("...md,...df->...mf", x, w, jnp.float32).dtype == jnp.float32


def test_one_form_on_every_platform():
  """No custom VJP and no optimization barrier: a CPU program is the accelerators' program (what aot compiles)."""
  x, w = _inputs((2, 24, 16), (16, 40), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul.einsum("BTD,DF->BTF", x, w) ** 2), argnums=(0, 1)))
  text = grad.lower(x, w).as_text()
  assert "optimization_barrier" not in text and "custom_vjp" not in text


def test_remat_policies_tell_projections_from_attention_dots(capsys):
  """dots_no_batch saves a projection's output (no batch dims) but not attention's scores (batched over B, K);
  checkpoint_dots saves both; nothing_saveable neither."""
  x, w = _inputs((2, 24, 16), (16, 40), jnp.float32)
  q, k = _inputs((2, 24, 2, 3, 8), (2, 24, 2, 8), jnp.float32)
  def loss(x, w, q, k):
    proj = matmul.einsum("BTD,DF->BTF", jnp.sin(x), w)
    scores = matmul.einsum("BTKGH,BSKH->BKGTS", jnp.sin(q), k)
    return jnp.sum(jnp.sin(proj)) + jnp.sum(jnp.sin(scores))
  def saved(policy):
    print_saved_residuals(jax.checkpoint(loss, policy=policy), x, w, q, k)
    return capsys.readouterr().out
  proj = "f32[2,24,40] output of dot_general"
  dots = lambda text: text.count("output of dot_general")
  no_batch = saved(jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
  assert proj in no_batch and dots(no_batch) == 1
  every = saved(jax.checkpoint_policies.checkpoint_dots)
  assert proj in every and dots(every) == 2
  assert dots(saved(jax.checkpoint_policies.nothing_saveable)) == 0
