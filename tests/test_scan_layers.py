"""Scanned layers vs unrolled (same weights mapped by models/layout.py): forward logits and gradients on every family,
a Gemma 3 leftover, packed segments; remat policies; the activation sharding constraint; Adam's mu_dtype; gradient
accumulation lowering the compiled step's temporary memory; a stage initialised from a run of the other layout; the
warning for a preset that init_from overrides."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import sft
from tests.test_train_step import lm_batch, opt_cfg
from towerplus_jax import losses, sharding
from towerplus_jax.files import checkpoint
from towerplus_jax.models import config as model_config
from towerplus_jax.models import layout
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer, abstract_model
from towerplus_jax.run import stage
from towerplus_jax.training import optim, weights
from towerplus_jax.training import state as state_lib
from towerplus_jax.training.step import StepOptions, make_train_step

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
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):  # float32 summation order: 1e-6 of the leaf
      np.testing.assert_allclose(g, w, atol=1e-6 * float(np.abs(w).max()), rtol=1e-6, err_msg=policy)


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
  tx, lr = optim.make(opt_cfg(), 10)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  graphdef, state = state_lib.abstract(abstract_model(cfg), tx, mesh)
  step = make_train_step(graphdef, StepOptions(losses.get("lm"), losses.default_config("lm"), tx, lr, micro))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lm_batch(cfg, b=16, t=64))
  with jax.set_mesh(mesh):
    return jax.jit(step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_micro_batches_lower_temporary_memory():
  one, four = _temp_bytes(1), _temp_bytes(4)
  assert four < 0.5 * one, (one, four)


def test_weight_decay_mask_on_stacked_params():
  """Stacked norm scales are 2-D ([G, D]) yet still spared, by name."""
  mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(_pair(CASES["qwen2"])[1], nnx.Param)))
  block = mask["stack"][0]
  assert block["attn"]["q_DNH"] is True and block["mlp"]["down_FD"] is True
  assert block["attn"]["q_bias_NH"] is False and block["pre_attn_norm"]["scale"] is False


def _tiny_sft(scan: bool, init_from: str = ""):
  """One step of a tiny SFT stage at lr 0 (it saves the params it started from); the same compiled step in every run,
  another seed when initialised from a run (a random init in place of the checkpoint's params would show)."""
  c = sft.get_config("tiny")
  c.init_from = init_from
  c.model.scan_layers = scan
  c.data.update(seq_len=64, eval="")
  c.train.update(steps=1, global_batch_size=4, log_every=1, seed=1 if init_from else 0)
  c.optimizer.lr = 0.0
  return c


def _saved(workdir: str) -> tuple[ModelConfig, dict]:
  """A run's model config and saved params (host arrays, in its layout)."""
  cfg = model_config.load_json(workdir)
  model = weights.restore_model(cfg, sharding.make_mesh({}, jax.devices()[:1]), os.path.join(workdir, "checkpoints"))
  return cfg, jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def test_init_from_a_run_of_the_other_layer_layout(tmp_path):
  """A run saved unrolled starts a scanned stage (init_from=ckpt:), whose run starts an unrolled one: each starts
  from the params saved before it, placed on their shardings, and its first step's loss is the saved run's (the same
  params and batch in the other layout)."""
  runs = [str(tmp_path / name) for name in ("unrolled", "scanned", "unrolled_again")]
  first_losses = [stage.train(_tiny_sft(False), runs[0])["loss"]]
  config = _tiny_sft(True, f"ckpt:{runs[0]}")
  mesh = sharding.make_mesh(dict(config.mesh))
  state = nnx.state(weights.load_model(config, mesh, vocab_size=0)[1])
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(sharding.state_shardings(state, mesh))):
    assert x.sharding == s
  first_losses.append(stage.train(config, runs[1])["loss"])
  first_losses.append(stage.train(_tiny_sft(False, f"ckpt:{runs[1]}"), runs[2])["loss"])
  np.testing.assert_allclose(first_losses, first_losses[0], rtol=1e-5)
  (cfg0, want), *rest = map(_saved, runs)
  assert [cfg.scan_layers for cfg, _ in rest] == [True, False]
  for cfg, params in rest:  # lr 0: what a run saved is what it started from
    got = layout.convert(params, cfg, cfg0)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_preset_init_from_overrides_warns_once(tmp_path, caplog):
  """init_from gives the architecture: a preset naming another model warns (one line naming the key); the configs'
  default preset and a preset of the same model do not."""
  cfg = ModelConfig.tiny("gemma2").replace(vocab_size=640)  # a tiny run's: its tokenizer's vocab
  checkpoint.save_params(str(tmp_path / "checkpoints"), nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)))))
  model_config.save_json(cfg, str(tmp_path))
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  for name, warns in (("tiny", False), ("tiny_gemma2", False), ("tiny_qwen3", True)):
    config = sft.get_config("tiny")
    config.init_from, config.model.preset = f"ckpt:{tmp_path}", name
    caplog.clear()
    weights.load_model(config, mesh, vocab_size=0)
    lines = [r.getMessage() for r in caplog.records if "config.model.preset" in r.getMessage()]
    assert len(lines) == warns, (name, lines)
  assert lines[0] == (f"config.model.preset=tiny_qwen3 is ignored: config.init_from=ckpt:{tmp_path} gives the "
                      "architecture, family='gemma2' (preset: 'qwen3')")
