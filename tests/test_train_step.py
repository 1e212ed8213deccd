"""The jitted train step: gradient accumulation equals one big batch; 8-device fsdp+tensor equals 1 device;
non-finite gradients skip the update; the weight-decay mask spares norms and biases."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from towerplus_jax import losses, sharding
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.training import optim, trainer
from towerplus_jax.training import state as state_lib
from towerplus_jax.training.step import StepOptions, make_train_step


def opt_cfg(**kw):
  c = ml_collections.ConfigDict(dict(lr=1e-2, schedule="cosine", warmup_steps=2, warmup_ratio=0.0, end_lr_ratio=0.1,
                                     weight_decay=0.1, b1=0.9, b2=0.99, eps=1e-8, clip_norm=1.0))
  c.update(kw)
  return c


def lm_batch(cfg, b=8, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)}


def run_steps(cfg, micro, mesh=None, steps=2, batch_fn=lm_batch):
  metrics = None
  mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  # eps well above float32 rounding of the gradients: with eps=1e-8 Adam's first steps move a parameter by about
  # ±lr whatever the size of its gradient, so rounding noise in a near-zero gradient (a different summation order)
  # becomes a difference of up to 2·lr between two correct computations.
  tx, lr = optim.make(opt_cfg(eps=1e-4), 10)
  graphdef, state = state_lib.init(model, tx, mesh, seed=0)
  step = jax.jit(make_train_step(graphdef, StepOptions(losses.get("lm"), losses.default_config("lm"), tx, lr, micro)))
  with jax.set_mesh(mesh):
    for i in range(steps):
      state, metrics = step(state, sharding.shard_local_batch(batch_fn(cfg, seed=i), mesh))
  return jax.device_get(nnx.to_pure_dict(state.params)), jax.device_get(metrics)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_grad_accumulation_equals_big_batch():
  cfg = ModelConfig.tiny("qwen2")
  p1, m1 = run_steps(cfg, micro=1)
  p4, m4 = run_steps(cfg, micro=4)
  assert_trees_close(p1, p4, atol=1e-6)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(m1["ntokens"], m4["ntokens"])


def test_sharded_training_matches_single_device():
  cfg = ModelConfig.tiny("gemma2")
  single, ms = run_steps(cfg, micro=1)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  multi, mm = run_steps(cfg, micro=2, mesh=mesh)
  assert_trees_close(single, multi, atol=1e-6)
  np.testing.assert_allclose(ms["loss"], mm["loss"], rtol=1e-5)


def test_nonfinite_gradients_skip_the_update():
  cfg = ModelConfig.tiny("qwen3")

  def nan_batch(cfg, seed):
    b = lm_batch(cfg, seed=seed)
    b["loss_mask"] = b["loss_mask"] * np.nan
    return b
  params, metrics = run_steps(cfg, micro=1, steps=3, batch_fn=nan_batch)
  fresh, _ = run_steps(cfg, micro=1, steps=2)  # finite steps (lr is 0 at step 0) move the params ...
  initial = jax.device_get(nnx.to_pure_dict(nnx.state(sharding.create_sharded(
      lambda: Transformer(cfg, rngs=nnx.Rngs(0)), sharding.make_mesh({}, jax.devices()[:1])))))
  assert_trees_close(params, initial, atol=0)  # ... three NaN steps do not
  assert max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(fresh), jax.tree.leaves(initial))) > 1e-4
  assert int(metrics["nonfinite/consecutive"]) == 3 and int(metrics["nonfinite/total"]) == 3
  try:
    trainer.check_finite(metrics, 3, 3)
  except FloatingPointError as e:
    assert "3 consecutive" in str(e) and "max_nonfinite=3" in str(e)
  else:
    raise AssertionError("no error after 3 non-finite steps")


def test_weight_decay_mask_spares_norms_and_biases():
  cfg = ModelConfig.tiny("qwen2")
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))
  mask = nnx.to_pure_dict(optim.decay_mask(params))
  assert mask["layers"][0]["attn"]["q_DNH"] is True
  assert mask["layers"][0]["attn"]["q_bias_NH"] is False  # a 2-D [N, H] bias: still no decay
  assert mask["layers"][0]["pre_attn_norm"]["scale"] is False


def test_remat_policies_give_the_same_gradients():
  cfg = ModelConfig.tiny("gemma3")
  batch = {k: jnp.asarray(v) for k, v in lm_batch(cfg).items()}
  grads = {}
  for policy in ("none", "full", "dots_no_batch"):
    model = Transformer(cfg.replace(remat=policy), rngs=nnx.Rngs(0))
    loss_fn = lambda m: losses.get("lm").fn(m, batch, jax.random.key(0), losses.default_config("lm"))[0]
    grads[policy] = nnx.to_pure_dict(nnx.grad(loss_fn)(model))
  for policy in ("full", "dots_no_batch"):
    assert_trees_close(grads[policy], grads["none"], atol=1e-6)


def test_select_guard_equals_optax_apply_if_finite():
  """optim.apply_if_finite (jnp.where, no lax.cond: the cond cost 3.7 GiB per chip in the compiled gemma2_9b step
  with libtpu 0.0.42) gives optax's updates and state bit for bit over finite, NaN and inf steps, up to giving up."""
  import optax
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  ours, ref = optim.apply_if_finite(inner, 3), optax.apply_if_finite(inner, 3)
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  s_ours, s_ref = ours.init(params), ref.init(params)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
  for i, bad in enumerate([None, jnp.nan, None, jnp.inf, jnp.nan, jnp.nan, jnp.nan, None]):
    grads = {"w": jnp.full((2, 3), 0.1 * (i + 1)), "b": jnp.linspace(-1, 1, 3)}
    if bad is not None:
      grads["b"] = grads["b"].at[1].set(bad)
    u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, params)
    u_ref, s_ref = jax.jit(ref.update)(grads, s_ref, params)
    for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = optax.apply_updates(params, u_ref)
  assert int(s_ours.total_notfinite) == 5 and int(s_ours.notfinite_count) == 0
