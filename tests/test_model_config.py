"""Presets: parameter counts equal the published sizes; config validation; the config key table."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import cpt, grpo, sft, tower_plus, wpo
from towerplus_jax import losses
from towerplus_jax.config import keys
from towerplus_jax.models.config import PRESETS, ModelConfig, preset
from towerplus_jax.models.transformer import abstract_model

# Published parameter counts (HF model cards / safetensors metadata; Gemma 3 text-only towers).
PUBLISHED = {
    "gemma2_2b": 2.614e9, "gemma2_9b": 9.242e9, "gemma2_27b": 27.23e9,
    "gemma3_1b": 0.9999e9, "gemma3_4b": 3.880e9, "gemma3_12b": 11.77e9, "gemma3_27b": 27.01e9,
    "qwen2_5_0_5b": 0.494e9, "qwen2_5_1_5b": 1.544e9, "qwen2_5_3b": 3.086e9, "qwen2_5_7b": 7.616e9,
    "qwen2_5_14b": 14.77e9, "qwen2_5_32b": 32.76e9, "qwen2_5_72b": 72.71e9,
    "qwen3_0_6b": 0.596e9, "qwen3_1_7b": 1.721e9, "qwen3_4b": 4.022e9, "qwen3_8b": 8.191e9,
    "qwen3_14b": 14.77e9, "qwen3_32b": 32.76e9,
}


def count(cfg: ModelConfig) -> int:
  """Parameters of `Transformer(cfg)`, by arithmetic (no tracing: ~20 presets in milliseconds)."""
  d, n, k, h = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = d * h * (2 * n + 2 * k) + cfg.qkv_bias * h * (n + 2 * k) + cfg.qk_norm * 2 * h
  norms = (4 if cfg.is_gemma else 2) * d
  layer = attn + 3 * d * cfg.mlp_dim + norms
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return cfg.vocab_size * d + cfg.num_layers * layer + d + head


def traced_count(cfg: ModelConfig) -> int:
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2", "qwen3"])
def test_count_formula_equals_the_real_model(family):
  """The arithmetic count is exact on a tiny model of each family (biases, q/k norms, untied head)."""
  cfg = preset(f"tiny_{family}").replace(num_layers=2, layer_types=())
  assert count(cfg) == traced_count(cfg)


def test_every_preset_has_a_published_count():
  assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count(name):
  assert count(preset(name)) == pytest.approx(PUBLISHED[name], rel=0.01)


def test_tiny_presets_and_errors():
  for fam in ("gemma2", "gemma3", "qwen2", "qwen3"):
    assert preset(f"tiny_{fam}").family == fam
  with pytest.raises(ValueError, match="unknown model preset"):
    preset("gemma2_3b")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig.tiny().replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="layer_types"):
    ModelConfig.tiny().replace(layer_types=("full",))


def leaves(config, prefix=""):
  """Dotted paths of every non-section key."""
  return [p for k, v in config.items()
          for p in (leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k])]


@pytest.mark.parametrize("arg", ["tiny", "gemma2_2b"])
def test_every_config_key_is_in_the_table_and_every_table_key_in_a_config(arg):
  used = set()
  chain = tower_plus.get_config(arg)
  stage_configs = [m.get_config(arg) for m in (cpt, sft, wpo, grpo)] + list(chain.stages.values())
  for config in stage_configs:
    declared = keys.stage_keys(config.loss.name)
    assert sorted(leaves(config)) == sorted(k.path for k in declared), config.loss.name
    used |= {id(k) for k in declared}
  top = [p for p in leaves(chain) if not p.startswith("stages.")]
  assert sorted(top) == sorted(k.path for k in keys.chain_keys())
  used |= {id(k) for k in keys.chain_keys()}
  assert [k.path for k in keys.KEYS if id(k) not in used] == []  # no unused entries


def test_each_key_is_declared_once():
  for loss in losses.names():
    paths = [k.path for k in keys.stage_keys(loss)]
    assert len(paths) == len(set(paths)), loss
  assert {loss for k in keys.KEYS for loss in k.losses} <= set(keys.LOSSES) == set(losses.names())
  chain = [k.path for k in keys.chain_keys()]
  assert len(chain) == len(set(chain))


def test_keys_md_is_up_to_date():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "KEYS.md")
  with open(path) as f:
    assert f.read() == keys.markdown(), "regenerate it: python -m towerplus_jax.config.keys > configs/KEYS.md"
