"""Chunked log-prob kernel == full logits (XLA) for every statistic and every loss, values and parameter gradients;
tied/untied heads, softcap on/off, chunks that do and do not divide the tokens; vocab split over "tensor" on 8
devices == one device; the compiled train step's memory is far below the full-logits step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fake_lm import FakeLM
from towerplus_jax import losses, sharding
from towerplus_jax.losses import logprobs
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer

B, T, V = 2, 8, 256  # 16 tokens: chunk 8 divides them, chunk 6 does not (3 chunks of 6, 2 padded)
# gemma2: tied head + final softcap; qwen2: untied head, no softcap


def tiny(family, vocab=V):
  cfg = ModelConfig.tiny(family, vocab_size=vocab)
  return cfg.replace(num_layers=1, layer_types=cfg.layer_types[:1])


def split_model(family):
  cfg = tiny(family)
  assert cfg.tie_embeddings == (family == "gemma2") and (cfg.final_logit_softcap is not None) == (family == "gemma2")
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))


def rows(rng, b, t, prefix=""):
  tokens = rng.integers(0, V, (b, t + 1)).astype(np.int32)
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  mask[:, :2] = 0.0
  return {f"{prefix}inputs": tokens[:, :-1], f"{prefix}targets": tokens[:, 1:], f"{prefix}loss_mask": mask,
          f"{prefix}segment_ids": np.ones((b, t), np.int32),
          f"{prefix}positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)}


def make_batch(name, b=B, seed=0):
  rng = np.random.default_rng(seed)
  if name in ("lm", "sft"):
    return rows(rng, b, T)
  if name in ("dpo", "wpo"):
    batch = {**rows(rng, b, T, "chosen_"), **rows(rng, b, T - 2, "rejected_")}
    return {**batch, "ref_chosen_logp": rng.normal(size=b).astype(np.float32) * 2 - 30,
            "ref_rejected_logp": rng.normal(size=b).astype(np.float32) * 2 - 25}
  batch = rows(rng, b, T)
  logp = np.full((b, T), -np.log(V), np.float32)
  return {**batch, "advantages": rng.normal(size=b).astype(np.float32),
          "old_logps": (logp + rng.normal(size=(b, T)) * 0.3).astype(np.float32),
          "ref_logps": (logp + rng.normal(size=(b, T)) * 0.3).astype(np.float32)}


def loss_cfg(name, chunk):
  c = losses.default_config(name)
  c.logprob_chunk = chunk
  if name == "sft":
    c.z_loss = 1e-2
  if name == "grpo":
    c.update(beta=0.04, temperature=0.7, epsilon_high=0.28)
  return c


def value_and_grad(name, graphdef, params, batch, chunk):
  fn = lambda p: losses.get(name).fn(nnx.merge(graphdef, p), batch, jax.random.key(0), loss_cfg(name, chunk))
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


def assert_close(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(np.abs(w).max(), 1e-3))


@pytest.mark.parametrize("family, chunk, temperature", [("gemma2", 6, 0.7), ("qwen2", 8, 1.0)])
def test_every_statistic_and_its_gradient_match_full_logits(family, chunk, temperature):
  graphdef, params = split_model(family)
  batch = {k: jnp.asarray(v) for k, v in make_batch("lm").items()}
  argmax_BT = jnp.argmax(nnx.merge(graphdef, params)(batch["inputs"]), axis=-1).astype(jnp.int32)
  batch["targets"] = batch["targets"].at[:, ::2].set(argmax_BT[:, ::2])  # half the tokens are "correct"

  def stats_and_grad(chunk):
    def objective(p):  # every statistic with a gradient, weighted so none cancels another
      s = logprobs.token_stats(nnx.merge(graphdef, p), batch, chunk=chunk, temperature=temperature,
                               want=logprobs.STATS)
      return jnp.sum(s["logp"] + 0.1 * s["lse"] ** 2 + 0.3 * s["lse2"] + 0.2 * s["entropy"]), s
    return jax.jit(jax.grad(objective, has_aux=True))(params)

  want_grad, want = stats_and_grad(0)
  assert set(want) == set(logprobs.STATS) and 0.5 <= float(jnp.mean(want["correct"])) < 1
  got_grad, got = stats_and_grad(chunk)
  assert_close(got, want)
  assert_close(got_grad, want_grad)


@pytest.mark.parametrize("name, family, chunk", [("lm", "gemma2", 6), ("sft", "qwen2", 8), ("dpo", "qwen2", 6),
                                                 ("wpo", "gemma2", 8), ("grpo", "gemma2", 6), ("grpo", "qwen2", 8)])
def test_losses_metrics_and_gradients_match_full_logits(name, family, chunk):
  graphdef, params = split_model(family)
  batch = make_batch(name)
  (want_loss, want_metrics), want_grad = value_and_grad(name, graphdef, params, batch, 0)
  assert {"sft": "z_loss", "wpo": "wpo/weight", "grpo": "kl"}.get(name, "loss") in want_metrics
  (loss, metrics), grad = value_and_grad(name, graphdef, params, batch, chunk)
  assert_close(loss, want_loss)
  assert_close(metrics, want_metrics)
  assert_close(grad, want_grad)


@pytest.mark.parametrize("name", ["dpo", "grpo"])
def test_reference_fns_match_full_logits(name):
  model = nnx.merge(*split_model("gemma2"))
  batch = make_batch(name)
  ref = losses.get(name).reference_fn
  assert_close(ref(model, batch, loss_cfg(name, 6)), ref(model, batch, loss_cfg(name, 0)))


@pytest.mark.parametrize("name, family, sizes", [
    ("sft", "gemma2", {"fsdp": 4, "tensor": 2}),
    ("wpo", "qwen2", {"data": 2, "fsdp": 1, "tensor": 4})])
def test_split_vocab_on_8_devices_matches_one_device(name, family, sizes):
  """8 rows over the batch axes, the vocab over "fsdp" x "tensor" (the fsdp group's hidden states gathered): each
  device computes its vocab slice for its group's tokens in chunks of 6."""
  cfg = tiny(family)
  batch = make_batch(name, b=8)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  (want_loss, want_metrics), want_grad = value_and_grad(name, graphdef, params, batch, 0)
  mesh = sharding.make_mesh(sizes)
  graphdef, sharded = nnx.split(sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh))
  fn = lambda p, b: losses.get(name).fn(nnx.merge(graphdef, p), b, jax.random.key(0), loss_cfg(name, 6))
  with jax.set_mesh(mesh):
    device_batch = sharding.shard_local_batch(batch, mesh)
    step = jax.jit(jax.value_and_grad(fn, has_aux=True))
    hlo = step.lower(sharded, device_batch).compile().as_text()
    (loss, metrics), grad = step(sharded, device_batch)
  assert_close(loss, want_loss)
  assert_close(metrics, want_metrics)
  assert_close(grad, want_grad)
  # The per-device chunk's logits: 6 tokens x this device's slice of the vocab; never the full vocab.
  split = sizes["fsdp"] * sizes["tensor"]
  assert f"f32[6,{V // split}]" in hlo and f"f32[6,{V}]" not in hlo


def test_chunked_train_step_needs_far_less_memory():
  """When logits dominate (B·T = 512 tokens >> D = 64, V = 16384), the chunked gradient's temporaries are a fraction
  of the full-logits one's: one [32, V] block at a time plus the head's gradient [D, V] instead of [B, T, V]."""
  vocab = 16384
  cfg = tiny("qwen2", vocab=vocab)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  batch = {k: jnp.asarray(v) for k, v in rows(np.random.default_rng(0), 4, 128).items()}

  def temp_bytes(chunk):
    fn = lambda p: losses.get("lm").fn(nnx.merge(graphdef, p), batch, None, loss_cfg("lm", chunk))[0]
    return jax.jit(jax.grad(fn)).lower(params).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(0), temp_bytes(32)
  assert full > 4 * 512 * vocab  # the full path holds at least the [B, T, V] float32 logits (or their gradient)
  assert chunked < full / 3, (chunked, full)


def test_bad_chunk_and_misspelt_key_are_named():
  model, batch = FakeLM(np.zeros((V, 5))), make_batch("lm")
  with pytest.raises(ValueError, match="logprob_chunk must be >= 0"):
    losses.get("lm").fn(model, batch, None, loss_cfg("lm", -1))
  with pytest.raises(ValueError, match="unknown key.*'logprob_chunks'.*'logprob_chunk'"):
    losses.get("grpo").fn(model, batch, None, ml_collections.ConfigDict({"logprob_chunks": 8}))


def test_bfloat16_head_gradient_is_summed_over_chunks_in_float32():
  """In bf16, 64 chunks of 16 tokens give the head's gradient no more error (vs float32) than the full path."""
  cfg = tiny("qwen2")
  batch = {k: jnp.asarray(v) for k, v in rows(np.random.default_rng(0), 4, 256).items()}

  def head_grad(chunk, dtype):
    graphdef, params = nnx.split(Transformer(cfg.replace(dtype=dtype), rngs=nnx.Rngs(0)))
    fn = lambda p: losses.get("lm").fn(nnx.merge(graphdef, p), batch, None, loss_cfg("lm", chunk))[0]
    return np.asarray(jax.jit(jax.grad(fn))(params)["lm_head_DV"][...], np.float64)

  exact = head_grad(0, "float32")
  error = lambda g: np.linalg.norm(g - exact) / np.linalg.norm(exact)
  assert error(head_grad(16, "bfloat16")) < 1.1 * error(head_grad(0, "bfloat16"))


def test_target_logp_custom_gradient_matches_autodiff_of_log_softmax():
  """The fused backward g·(onehot − softmax) == autodiff through log_softmax + pick, for unequal per-token weights."""
  logits_BTV = 4.0 * jax.random.normal(jax.random.key(0), (2, 3, 11))
  targets_BT = jnp.array([[0, 10, 3], [5, 5, 7]])
  g_BT = jnp.arange(6.0).reshape(2, 3) - 2.0

  def reference(x):
    picked = jnp.take_along_axis(jax.nn.log_softmax(x), targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(picked * g_BT)

  ours = lambda x: jnp.sum(logprobs.target_logp(x, targets_BT) * g_BT)
  np.testing.assert_allclose(ours(logits_BTV), reference(logits_BTV), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits_BTV), jax.grad(reference)(logits_BTV), atol=1e-6)
