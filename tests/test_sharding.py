"""Mesh construction, logical rules, sharded creation, sharded forward == single-device forward.
(The vocab-parallel log-prob kernel is tested in test_logprobs.py.)"""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_mesh_shape_resolves_rest():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)


def test_logical_to_spec_drops_non_dividing_axes():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
  # 2 kv heads cannot be split 4 ways: replicated on that dim
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
  assert sharding.logical_to_spec(("norm",), (64,), mesh) == P(None)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_sharded_forward_matches_single_device(family):
  cfg = ModelConfig.tiny(family)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(3))
  sharded = sharding.create_sharded(make, mesh)
  q = sharded.layers[0].attn.q_DNH[...]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 2, 16)
  single = make()
  tokens = jax.random.randint(jax.random.key(0), (4, 12), 0, cfg.vocab_size)
  want = single(tokens)
  with jax.set_mesh(mesh):
    batch = sharding.shard_local_batch({"tokens": np.asarray(tokens)}, mesh)
    got = nnx.jit(lambda m, t: m(t))(sharded, batch["tokens"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [8, 16, 6])
def test_shard_global_batch_places_every_row(rows):
  """Split over the batch axes when they divide the rows, replicated otherwise; the global array is the batch."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  x = np.arange(rows * 3, dtype=np.int32).reshape(rows, 3)
  out = sharding.shard_global_batch({"x": x, "n": np.int32(5)}, mesh)
  np.testing.assert_array_equal(np.asarray(out["x"]), x)
  assert out["x"].sharding.spec[0] == (("data", "fsdp") if rows % 8 == 0 else "data")
  np.testing.assert_array_equal(sharding.process_rows(mesh, rows), np.arange(rows))  # one process holds all rows


def test_embedding_gradient_is_a_reduction_over_data_shards_and_equals_take():
  """layers._lookup's backward (per data shard, then summed over "data") equals jnp.take's gradient, sharded or not."""
  from towerplus_jax.models import layers
  table = jax.random.normal(jax.random.key(0), (64, 16))
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, 64)
  cot = jax.random.normal(jax.random.key(2), (8, 12, 16))
  def grad(lookup):
    return jax.jit(jax.grad(lambda t: (lookup(t, tokens) * cot).sum()))(table)
  expected = grad(lambda t, i: jax.numpy.take(t, i, axis=0))
  np.testing.assert_allclose(grad(layers._lookup), expected, rtol=1e-6, atol=1e-6)
  with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):  # the per-data-shard backward
    np.testing.assert_allclose(grad(layers._lookup), expected, rtol=1e-6, atol=1e-6)
