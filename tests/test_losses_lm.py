"""lm/sft loss: cross entropy, z-loss and metrics vs numpy; masking; micro-batch splitting; registry."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fake_lm import FakeLM, np_log_softmax
from towerplus_jax import losses

B, T, V = 4, 6, 11


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(B * T, V)) * 3
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  mask[0, :] = 1.0
  batch = {
      "inputs": np.arange(B * T, dtype=np.int32).reshape(B, T),
      "targets": rng.integers(0, V, (B, T)).astype(np.int32),
      "loss_mask": mask,
      "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
      "segment_ids": np.ones((B, T), np.int32),
  }
  return table, batch


def cfg(**kw):
  return ml_collections.ConfigDict({"name": "sft", "z_loss": 0.0, **kw})


def test_registry_and_config():
  assert {"lm", "sft", "dpo", "wpo", "grpo"} <= set(losses.names())
  with pytest.raises(ValueError, match="registered: .*'grpo'.*'lm'"):
    losses.get("nope")
  assert dict(losses.default_config("lm")) == {"name": "lm", "z_loss": 0.0, "logprob_chunk": 512}
  table, batch = make_batch()
  with pytest.raises(ValueError, match="unknown key.*'z_los'"):
    losses.get("lm").fn(FakeLM(table), batch, jax.random.key(0), ml_collections.ConfigDict({"z_los": 1.0}))
  with pytest.raises(KeyError, match="loss_mask"):
    losses.get("sft").fn(FakeLM(table), {k: v for k, v in batch.items() if k != "loss_mask"}, None, cfg())


@pytest.mark.parametrize("name", ["lm", "sft"])
def test_cross_entropy_z_loss_and_metrics_match_numpy(name):
  table, batch = make_batch()
  z = 1e-2
  loss, metrics = losses.get(name).fn(FakeLM(table), batch, jax.random.key(0), cfg(z_loss=z))
  logits = table[batch["inputs"]]
  logp = np.take_along_axis(np_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  m = batch["loss_mask"]
  n = m.sum()
  ce = -(logp * m).sum() / n
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  z_term = z * (lse ** 2 * m).sum() / n
  acc = ((logits.argmax(-1) == batch["targets"]) * m).sum() / n
  np.testing.assert_allclose(float(loss), ce + z_term, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["z_loss"]), z_term, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
  assert float(metrics["ntokens"]) == n
  assert float(losses.loss_denominator(name, batch, cfg())) == n


def test_masked_positions_do_not_change_loss_or_get_gradient():
  table, batch = make_batch()
  fn = lambda t: losses.get("sft").fn(FakeLM(t), batch, None, cfg(z_loss=1e-3))[0]
  masked_ids = batch["inputs"][batch["loss_mask"] == 0]
  assert masked_ids.size > 0
  changed = table.copy()
  changed[masked_ids] = np.random.default_rng(9).normal(size=(masked_ids.size, V)) * 50
  np.testing.assert_allclose(float(fn(changed)), float(fn(table)), rtol=1e-6)
  grad = np.asarray(jax.grad(fn)(jnp.asarray(table)))
  assert np.all(grad[masked_ids] == 0) and np.any(grad != 0)


def test_micro_batches_with_global_denominator_equal_full_batch():
  table, batch = make_batch(1)
  c = cfg(z_loss=1e-3)
  fn = losses.get("lm").fn

  def loss_and_grad(b):
    return jax.jit(jax.value_and_grad(lambda t: fn(FakeLM(t), b, None, c)[0]))(jnp.asarray(table))

  full_loss, full_grad = loss_and_grad(batch)
  _, full_metrics = fn(FakeLM(table), batch, None, c)
  denom = losses.loss_denominator("lm", batch, c)
  parts = [{**{k: v[s] for k, v in batch.items()}, "loss_denominator": denom} for s in (slice(0, 1), slice(1, B))]
  results = [loss_and_grad(p) for p in parts]
  np.testing.assert_allclose(sum(float(l) for l, _ in results), float(full_loss), rtol=1e-5)
  np.testing.assert_allclose(sum(np.asarray(g) for _, g in results), np.asarray(full_grad), rtol=1e-4, atol=1e-7)
  part_metrics = [fn(FakeLM(table), p, None, c)[1] for p in parts]
  for key, value in full_metrics.items():
    np.testing.assert_allclose(sum(float(m[key]) for m in part_metrics), float(value), rtol=1e-5)
