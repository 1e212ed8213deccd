"""Attention kernels: splash (Pallas interpret mode on CPU) and the dot_product_attention mapping == the XLA oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.sft import get_config as get_sft_config
from towerplus_jax import sharding
from towerplus_jax.convert import hf_config
from towerplus_jax.models import attention
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.training import weights


def _packed(t: int, lengths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids 1..n for `lengths` then a padding tail (0); positions restart per segment (0 on padding)."""
  seg, pos = np.zeros(t, np.int32), np.zeros(t, np.int32)
  start = 0
  for i, n in enumerate(lengths):
    seg[start:start + n], pos[start:start + n] = i + 1, np.arange(n)
    start += n
  return seg, pos


def _inputs(b, t, n, k, h, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, kk, v = (jax.random.normal(key, (b, t, m, h), jnp.float32) for key, m in zip(keys, (n, k, k)))
  return q, kk, v, jax.random.normal(keys[3], (b, t, n, h), jnp.float32)


def _fwd_and_grads(impl, q, k, v, cot, valid_BT, **kw):
  """Output and (dq, dk, dv) of sum(out * cot) over valid (non-padding) query rows, in one jit."""
  def f(q, k, v):
    return attention.attend(q, k, v, impl=impl, **kw)
  def run(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cot * valid_BT[:, :, None, None])
  return jax.jit(run)(q, k, v)


def _assert_same(impl, q, k, v, cot, valid_BT, **kw):
  out, grads = _fwd_and_grads(impl, q, k, v, cot, valid_BT, **kw)
  ref_out, ref_grads = _fwd_and_grads("xla", q, k, v, cot, valid_BT, **kw)
  valid = np.asarray(valid_BT, bool)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out[valid], ref_out[valid], atol=1e-5, rtol=1e-5)
  for name, g, ref in zip("qkv", grads, ref_grads):
    assert float(jnp.abs(ref).max()) > 0, name
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_splash_packed_window_softcap_gqa():
  """Two packed segments + a padding tail, sliding window, soft-capping, 2 query heads per kv head (T=256, 128 blocks)."""
  t = 256
  seg, pos = _packed(t, (100, 120))
  seg_BT, pos_BT = jnp.asarray(seg)[None], jnp.asarray(pos)[None]
  q, k, v, cot = _inputs(1, t, 4, 2, 32)
  _assert_same("splash", q * 3, k, v, cot, seg_BT > 0, q_positions_BT=pos_BT, k_positions_BS=pos_BT,
               q_segments_BT=seg_BT, k_segments_BS=seg_BT, window=48, softcap=5.0, scale=0.5, block=128)


def test_splash_causal_unaligned_length():
  """No segments, plain causal, T=200 (not a block multiple: padded inside the wrapper)."""
  t = 200
  pos_BT = jnp.broadcast_to(jnp.arange(t), (1, t))
  q, k, v, cot = _inputs(1, t, 2, 2, 32, seed=1)
  _assert_same("splash", q, k, v, cot, jnp.ones((1, t), bool), q_positions_BT=pos_BT, k_positions_BS=pos_BT,
               scale=32 ** -0.5, block=512)


def test_dot_product_mapping_equals_reference():
  """The arguments handed to jax.nn.dot_product_attention (cuDNN on GPU) encode our masks: checked with its XLA path."""
  t = 64
  seg, pos = _packed(t, (20, 30))
  seg_BT, pos_BT = jnp.asarray(seg)[None], jnp.asarray(pos)[None]
  q, k, v, _ = _inputs(1, t, 4, 2, 16, seed=2)
  out = jax.jit(lambda q, k, v: attention.dot_product(q, k, v, seg_BT, 8, 0.25, "xla"))(q, k, v)
  ref = jax.jit(lambda q, k, v: attention.attend(q, k, v, q_positions_BT=pos_BT, k_positions_BS=pos_BT,
                                                 q_segments_BT=seg_BT, k_segments_BS=seg_BT, window=8,
                                                 scale=0.25))(q, k, v)
  valid = np.asarray(seg_BT > 0)
  np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_splash_under_mesh_equals_single_device():
  """shard_map over the batch (fsdp) and heads (tensor) gives the unsharded result."""
  t = 128
  seg, pos = _packed(t, (50, 60))
  seg_BT, pos_BT = jnp.asarray(np.stack([seg] * 4)), jnp.asarray(np.stack([pos] * 4))
  q, k, v, _ = _inputs(4, t, 4, 2, 32, seed=3)
  kw = dict(q_positions_BT=pos_BT, k_positions_BS=pos_BT, q_segments_BT=seg_BT, k_segments_BS=seg_BT, window=16,
            softcap=5.0, scale=0.2, impl="splash", block=128)
  ref = jax.jit(lambda q, k, v: attention.attend(q, k, v, **kw))(q, k, v)
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  with jax.set_mesh(mesh):
    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, **kw))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)


def test_cudnn_refusal_falls_back_to_xla(monkeypatch):
  """Where cuDNN refuses at trace time (here: no cuDNN on CPU), attend() runs the XLA reference instead."""
  t = 16
  pos_BT = jnp.broadcast_to(jnp.arange(t), (1, t))
  q, k, v, _ = _inputs(1, t, 2, 1, 8, seed=4)
  kw = dict(q_positions_BT=pos_BT, k_positions_BS=pos_BT, window=4, scale=0.3)
  monkeypatch.setattr(attention, "resolve", lambda *a, **k: "cudnn")
  np.testing.assert_array_equal(attention.attend(q, k, v, impl="auto", **kw), attention.attend(q, k, v, **kw))


@pytest.mark.parametrize("impl, platform, softcap, dtype, head_dim, want, why", [
    ("auto", "tpu", 50.0, "bfloat16", 256, "splash", "auto"),
    ("auto", "gpu", None, "bfloat16", 128, "cudnn", "on gpu"),
    ("auto", "gpu", 50.0, "bfloat16", 128, "xla", "soft-capping"),
    ("cudnn", "gpu", None, "float32", 128, "xla", "bfloat16/float16"),
    ("auto", "gpu", None, "bfloat16", 256, "xla", "head_dim=256"),
    ("cudnn", "cpu", None, "bfloat16", 128, "xla", "not gpu"),
    ("auto", "cpu", None, "float32", 64, "xla", "auto"),
    ("splash", "cpu", 50.0, "float32", 64, "splash", "interpret"),
    ("xla", "tpu", None, "bfloat16", 128, "xla", "'xla'"),
])
def test_choose(impl, platform, softcap, dtype, head_dim, want, why):
  got, reason = attention.choose(impl, platform=platform, softcap=softcap, dtype=dtype, head_dim=head_dim)
  assert got == want and why in reason


def test_bad_choice_names_the_options():
  with pytest.raises(ValueError, match="choose one of .*splash"):
    attention.choose("flash", platform="tpu", softcap=None, dtype="float32", head_dim=64)
  with pytest.raises(ValueError, match="attention='flash'; choose one of"):
    ModelConfig.tiny().replace(attention="flash")
  with pytest.raises(ValueError, match="multiple of 128"):
    ModelConfig.tiny().replace(attention_block=100)


def test_config_keys_reach_the_model_and_not_the_export():
  config = get_sft_config("tiny")
  config.model.attention, config.model.attention_block = "splash", 256
  cfg = ModelConfig.tiny().replace(**weights.model_overrides(config))
  assert (cfg.attention, cfg.attention_block) == ("splash", 256)
  assert "attention" not in hf_config.config_to_hf(cfg)  # a runtime choice, not architecture: export accepts any


def test_tiny_gemma2_splash_logits_equal_xla():
  """Gemma 2 (soft-cap 50, sliding window 8 on even layers), packed rows: splash model == xla model."""
  cfg = ModelConfig.tiny("gemma2", vocab_size=128).replace(num_layers=2, layer_types=("sliding", "full"))
  model = Transformer(cfg.replace(attention="xla"), rngs=nnx.Rngs(0))
  splash_model = Transformer(cfg.replace(attention="splash", attention_block=128), rngs=nnx.Rngs(0))
  t = 128
  seg, pos = _packed(t, (40, 70))
  seg_BT, pos_BT = jnp.asarray(seg)[None], jnp.asarray(pos)[None]
  tokens_BT = jax.random.randint(jax.random.key(1), (1, t), 0, cfg.vocab_size)
  fwd = nnx.jit(lambda m, x: m(x, pos_BT, seg_BT))
  ref, out = fwd(model, tokens_BT), fwd(splash_model, tokens_BT)
  valid = np.asarray(seg_BT > 0)
  np.testing.assert_allclose(out[valid], ref[valid], atol=1e-4, rtol=1e-5)
