"""Our decoder vs Hugging Face transformers on tiny random models of every family (float32, all weights random),
and our own consistency: packed segments == each alone, KV-cache decoding == the full forward; each with unrolled
and scanned layers."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from towerplus_jax.convert import hf
from towerplus_jax.models.config import FAMILIES

CASES = {  # name: (family, HF config overrides); the tiny models' own settings are in conftest.py
    "gemma2": ("gemma2", {}),
    "gemma2_small_caps": ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=2.0)),
    "gemma3": ("gemma3", {}),  # HF Gemma 3 ignores attn_logit_softcapping: the importer must drop it
    "gemma3_leftover": ("gemma3", dict(num_hidden_layers=5, layer_types=[  # scanned: 2 groups of 2 + 1 unrolled
        "sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


@pytest.fixture(scope="module")
def imported(tiny_hf_model):
  cache = {}

  def get(family, scan=False, **overrides):
    key = (family, scan, json.dumps(overrides, sort_keys=True))
    if key not in cache:
      cache[key] = hf.load_hf(tiny_hf_model(family, **overrides), overrides={"scan_layers": scan})
    return cache[key]
  return get


@nnx.jit
def _forward(model, tokens_BT, positions_BT=None, segment_ids_BT=None):
  return model(tokens_BT, positions=positions_BT, segment_ids=segment_ids_BT)


@nnx.jit
def _decode(model, tokens_BT, positions_BT, cache):
  return model.decode(tokens_BT, positions_BT, cache)


@SCAN
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, scan, tiny_hf_model, imported, hf_logits, tokens_BT):
  family, overrides = CASES[case]
  want = hf_logits(tiny_hf_model(family, **overrides), tokens_BT)
  cfg, model = imported(family, scan, **overrides)
  assert hasattr(model, "stack") == scan and cfg.scan_layers == scan
  got = np.asarray(_forward(model, jnp.asarray(tokens_BT)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  cap = imported(family, **overrides)[0].final_logit_softcap
  if cap and cap < 10:  # the small caps are reached, so they are really exercised
    assert np.abs(want).max() > 0.9 * cap


@SCAN
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segments_equal_separate_rows(family, scan, imported, tokens_BT):
  """Row r packs segment A (5 tokens) then B (7 tokens); alone, each is a causal row of its own (the logits of a
  row's first n tokens do not depend on what follows them)."""
  _, model = imported(family, scan)
  a_B5, b_B7 = tokens_BT[:, :5], tokens_BT[::-1, 5:]
  packed = jnp.asarray(np.concatenate([a_B5, b_B7], axis=1))
  positions = jnp.asarray(np.broadcast_to(np.r_[np.arange(5), np.arange(7)], (2, 12)))
  segments = jnp.asarray(np.broadcast_to(np.r_[[1] * 5, [2] * 7], (2, 12)))
  got = np.asarray(_forward(model, packed, positions, segments))
  alone_a = np.asarray(_forward(model, jnp.asarray(tokens_BT)))[:, :5]
  alone_b = np.asarray(_forward(model, jnp.asarray(np.concatenate([b_B7, a_B5], axis=1))))[:, :7]
  np.testing.assert_allclose(got[:, :5], alone_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got[:, 5:], alone_b, atol=1e-5, rtol=1e-5)


@SCAN
@pytest.mark.parametrize("case", ["gemma2", "gemma3_leftover", "qwen2", "qwen3"])
def test_kv_cache_decoding_equals_full_forward(case, scan, imported, tokens_BT):
  """Prefill 5 tokens, then one token per step (past the sliding window of 4): logits equal the full forward's."""
  family, overrides = CASES[case]
  _, model = imported(family, scan, **overrides)
  tokens = jnp.asarray(tokens_BT)
  b, t = tokens.shape
  full = np.asarray(_forward(model, tokens))
  prefill = 5
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  logits, cache = _decode(model, tokens[:, :prefill], positions[:, :prefill], model.init_cache(b, t))
  got = [np.asarray(logits)]
  for i in range(prefill, t):
    logits, cache = _decode(model, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=1e-5)


def test_rope_is_hugging_faces_rotate_half_formula():
  """layers.rope (a flip of the two halves, the sign in the sin table) equals HF's rotate_half formula written out
  (x1·cos − x2·sin, x2·cos + x1·sin) bit for bit, and transformers' own apply_rotary_pos_emb to float32 rounding."""
  import torch
  from transformers.models.qwen2 import modeling_qwen2

  from towerplus_jax.models.layers import rope
  rng = np.random.default_rng(0)
  x_BTNH = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
  positions_BT = np.stack([np.arange(7), np.array([5, 6, 0, 1, 2, 9, 40])])
  theta, scale = 1000.0, 4.0
  inv_freq = 1.0 / theta ** (np.arange(0, 16, 2, dtype=np.float32) / 16)
  angles = jnp.asarray(positions_BT / scale, jnp.float32)[..., None] * jnp.asarray(inv_freq)
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = x_BTNH[..., :8], x_BTNH[..., 8:]
  written_out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  ours = rope(jnp.asarray(x_BTNH), jnp.asarray(positions_BT), theta, scale)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(written_out))
  emb = torch.cat([torch.from_numpy(np.array(angles))] * 2, dim=-1)
  q = torch.from_numpy(x_BTNH).transpose(1, 2)  # HF: [B, N, T, H]
  hf_q, _ = modeling_qwen2.apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
  np.testing.assert_allclose(np.asarray(ours), hf_q.transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)
