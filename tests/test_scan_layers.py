"""Scanned layers vs unrolled (same weights mapped by models/layout.py): forward logits and gradients on every family,
a Gemma 3 leftover, packed segments; remat policies; the activation sharding constraint; Adam's mu_dtype; gradient
accumulation lowering the compiled step's temporary memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_train_step import lm_batch, opt_cfg
from towerplus_jax import losses, sharding
from towerplus_jax.models import layout
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer, abstract_model
from towerplus_jax.training import optim, train

CASES = {
    "gemma2": ModelConfig.tiny("gemma2"),  # period 2: 2 groups
    "gemma3_leftover": ModelConfig.tiny("gemma3").replace(  # period 6: 1 group + 2 unrolled layers
        num_layers=8, layer_types=("sliding",) * 5 + ("full", "sliding", "sliding")),
    "qwen2": ModelConfig.tiny("qwen2"),  # period 1: 4 groups
    "qwen3": ModelConfig.tiny("qwen3"),
}


def _pair(cfg: ModelConfig) -> tuple[Transformer, Transformer]:
  """An unrolled model and a scanned one holding the same weights."""
  unrolled = Transformer(cfg, rngs=nnx.Rngs(0))
  scanned = Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(1))
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, layout.convert(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)), cfg,
                                                 scanned.cfg))
  nnx.update(scanned, state)
  return unrolled, scanned


def _inputs(vocab: int):
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, vocab)
  positions = jnp.asarray(np.broadcast_to(np.r_[np.arange(6), np.arange(10)], (2, 16)))
  segments = jnp.asarray(np.broadcast_to(np.r_[[1] * 6, [2] * 10], (2, 16)))
  weights = jax.random.normal(jax.random.key(1), (2, 16, vocab))
  return tokens, positions, segments, weights


@nnx.jit
def _loss_and_grads(model, tokens, positions, segments, weights):
  def f(m):
    logits = m(tokens, positions, segments)
    return jnp.sum(jax.nn.log_softmax(logits) * weights), logits
  (_, logits), grads = nnx.value_and_grad(f, has_aux=True)(model)
  return logits, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_equals_unrolled_logits_and_grads(case):
  cfg = CASES[case]
  unrolled, scanned = _pair(cfg)
  args = _inputs(cfg.vocab_size)
  want_logits, want_grads = _loss_and_grads(unrolled, *args)
  logits, grads = _loss_and_grads(scanned, *args)
  np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
  grads = layout.convert(grads, scanned.cfg, cfg)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("case,scan", [("gemma2", False), ("gemma3_leftover", True)])
def test_remat_policies_give_identical_gradients(case, scan):
  """Inside the scan body (scanned) or around each block (unrolled and the scan's leftovers)."""
  cfg = CASES[case].replace(scan_layers=scan)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  args = _inputs(cfg.vocab_size)
  _, want = _loss_and_grads(model, *args)
  graphdef, state = nnx.split(model)
  for policy in ("full", "dots", "dots_no_batch", "offload"):
    remat_model = nnx.merge(nnx.split(Transformer(cfg.replace(remat=policy), rngs=nnx.Rngs(0)))[0], state)
    _, grads = _loss_and_grads(remat_model, *args)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-6, err_msg=policy)


def test_activation_constraint_only_under_a_mesh():
  cfg = CASES["qwen2"].replace(scan_layers=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((8, 16), jnp.int32)
  forward = lambda m, t: m(t)
  assert "sharding_constraint" not in nnx.jit(forward).lower(model, tokens).as_text()
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  with jax.set_mesh(mesh):
    text = nnx.jit(forward).lower(model, tokens).as_text()
  assert 'sharding_constraint' in text and '"data", "fsdp"' in text.replace("'", '"')


def test_mu_dtype_bfloat16():
  params = {"w": jnp.ones((4, 4), jnp.float32)}
  for mu_dtype, want in (("", jnp.float32), ("bfloat16", jnp.bfloat16)):
    tx, _ = optim.make(opt_cfg(mu_dtype=mu_dtype), 10)
    adam = [s for s in jax.tree.leaves(tx.init(params), is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    assert adam[0].mu["w"].dtype == want and adam[0].nu["w"].dtype == jnp.float32


def _temp_bytes(micro: int) -> int:
  cfg = CASES["qwen2"].replace(scan_layers=True, remat="full")
  graphdef, params = nnx.split(abstract_model(cfg))
  tx, lr = optim.make(opt_cfg(), 10)
  fns = train.make_step_fns(graphdef, losses.get("lm"), losses.default_config("lm"), tx, lr, micro, False)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": jax.ShapeDtypeStruct((), jnp.int32),
           "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm_batch(cfg, b=16, t=64))
  return jax.jit(fns.train).lower(state, None, batch).compile().memory_analysis().temp_size_in_bytes


def test_micro_batches_lower_temporary_memory():
  one, four = _temp_bytes(1), _temp_bytes(4)
  assert four < 0.5 * one, (one, four)


def test_weight_decay_mask_on_stacked_params():
  """Stacked norm scales are 2-D ([G, D]) yet still spared, by name."""
  mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(_pair(CASES["qwen2"])[1], nnx.Param)))
  block = mask["stack"][0]
  assert block["attn"]["q_DNH"] is True and block["mlp"]["down_FD"] is True
  assert block["attn"]["q_bias_NH"] is False and block["pre_attn_norm"]["scale"] is False
