"""Shared fixtures: tiny random Hugging Face models of every family, saved offline, and their reference logits."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from towerplus_jax import sharding
from towerplus_jax.data import tokenizers


_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
# Per family: sliding window 4 < the test length 12, softcaps on (Gemma 3's final cap small enough to bite),
# distinct rope thetas (Gemma 3: linear scaling on full layers), untied Qwens.
_FAMILY_KW = {
    "gemma2": dict(sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3": dict(sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                   final_logit_softcapping=3.0,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0}}),
    "qwen2": dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "qwen3": dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
}


def _classes(family: str):
  import transformers as tf
  return {"gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM), "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[family]


def randomize_(model, seed: int = 0) -> None:
  """Every weight random, norms and biases included (HF's zero/one inits would hide layout bugs)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 0.4 if name.endswith(("norm.weight", "bias")) else 0.15
      p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
  """Factory `tiny_hf_model(family, **config_overrides) -> folder` of a saved random HF model (cached per args)."""
  cache = {}

  def make(family: str, **overrides) -> str:
    key = (family, json.dumps(overrides, sort_keys=True))
    if key not in cache:
      config_cls, model_cls = _classes(family)
      config = config_cls(**{**_BASE, **_FAMILY_KW[family], **overrides})
      config._attn_implementation = "eager"
      model = model_cls(config)
      randomize_(model, seed=len(cache))
      folder = tmp_path_factory.mktemp(f"hf_{family}")
      model.save_pretrained(folder)
      cache[key] = str(folder)
    return cache[key]

  return make


@pytest.fixture(scope="session")
def hf_logits():
  """`hf_logits(folder, tokens_BT) -> float32 numpy logits` of the HF model in a folder (eager attention)."""
  def run(folder: str, tokens_BT: np.ndarray) -> np.ndarray:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
      return model(torch.as_tensor(np.asarray(tokens_BT))).logits.numpy()
  return run


@pytest.fixture(scope="session")
def tokens_BT() -> np.ndarray:
  return np.random.default_rng(0).integers(3, 256, size=(2, 12))


@pytest.fixture(scope="session")
def sample_sp_path() -> str:
  """The sample SentencePiece model, trained once where `config.data.tokenizer=sample` finds it."""
  return tokenizers.sample_tokenizer(tokenizers.SAMPLE_CACHE)


@pytest.fixture(scope="session")
def sample_tok(sample_sp_path) -> tokenizers.SentencePieceTokenizer:
  return tokenizers.SentencePieceTokenizer(sample_sp_path)


@pytest.fixture
def sigterm_on_batch(monkeypatch):
  """`sigterm_on_batch(n)`: the process gets SIGTERM while the loop shards its n-th batch (a preemption mid-run, the
  loop saves and stops); `monkeypatch.undo()` disarms it."""
  def arm(n: int = 3) -> None:
    calls = {"n": 0}
    shard = sharding.shard_global_batch

    def shard_then_stop(batch, mesh):
      calls["n"] += 1
      if calls["n"] == n:
        os.kill(os.getpid(), signal.SIGTERM)
      return shard(batch, mesh)
    monkeypatch.setattr(sharding, "shard_global_batch", shard_then_stop)
  return arm
