"""HF config.json <-> ModelConfig, for the transformers 4.x and 5.x layouts (Gemma 3 multimodal included)."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from towerplus_jax.models.config import ModelConfig, alternating, every_nth_full

_ARCHS = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "qwen3": "Qwen3ForCausalLM"}
_FAMILY = {"gemma2": "gemma2", "gemma3_text": "gemma3", "qwen2": "qwen2", "qwen3": "qwen3"}
_MODEL_TYPE = {family: model_type for model_type, family in _FAMILY.items()}
_MULTIMODAL = {"gemma3": "Gemma3ForConditionalGeneration"}  # model_type whose text part lives in text_config
_COMMON_DEFAULTS = dict(rms_norm_eps=1e-6, rope_theta=10_000.0)
_GEMMA_DEFAULTS = dict(_COMMON_DEFAULTS, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                       sliding_window=4096, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
_QWEN_DEFAULTS = dict(_COMMON_DEFAULTS, vocab_size=151_936, hidden_size=4096, intermediate_size=22016,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                      hidden_act="silu", use_sliding_window=False, sliding_window=4096, max_window_layers=28)
# transformers' config-class defaults for the keys a config.json may leave out.
HF_DEFAULTS = {
    "gemma2": dict(_GEMMA_DEFAULTS, vocab_size=256_000, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_GEMMA_DEFAULTS, vocab_size=262_208, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None),
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": dict(_QWEN_DEFAULTS, head_dim=128),
}
_ACTIVATION = {"gemma": ("hidden_activation", "gelu_pytorch_tanh"), "qwen": ("hidden_act", "silu")}


def text_config(hf_config: Mapping[str, Any]) -> tuple[str, dict]:
  """(model_type, config dict) of the text decoder; multimodal configs give their `text_config`."""
  model_type = hf_config.get("model_type")
  if model_type is None:
    by_arch = {arch: mt for mt, arch in {**_ARCHS, **_MULTIMODAL}.items()}
    model_type = next((by_arch[a] for a in hf_config.get("architectures") or () if a in by_arch), None)
  if model_type in _MULTIMODAL:
    return text_config({"model_type": "gemma3_text", **hf_config.get("text_config", {})})
  if model_type not in _FAMILY:
    raise ValueError(f"unsupported architecture: model_type={hf_config.get('model_type')!r}, "
                     f"architectures={hf_config.get('architectures')}; supported model types: "
                     f"{sorted(_FAMILY) + sorted(_MULTIMODAL)}")
  return model_type, {**HF_DEFAULTS[model_type], **{k: v for k, v in hf_config.items() if v is not None}}


def _rope(d: dict, kind: str) -> dict:
  """Rope theta and linear scale of one layer kind ("full_attention" / "sliding_attention"), new or legacy layout."""
  local = kind == "sliding_attention" and "rope_local_base_freq" in d  # Gemma 3: own theta, never scaled
  params = d.get("rope_parameters")
  if params is None:  # transformers 4.x: rope_theta / rope_local_base_freq / rope_scaling
    params = {} if local else dict(d.get("rope_scaling") or {})
  elif kind in params:
    params = params[kind]
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "linear"):
    raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' and 'linear')")
  theta = params.get("rope_theta", d["rope_local_base_freq"] if local else d["rope_theta"])
  return {"theta": float(theta), "scale": float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0}


def _layer_types(d: dict, model_type: str) -> list[str]:
  n = d["num_hidden_layers"]
  if d.get("layer_types"):
    return [t.removesuffix("_attention") for t in d["layer_types"]]
  if model_type == "gemma2":
    return list(alternating(n))
  if model_type == "gemma3_text":
    return list(every_nth_full(n, d["sliding_window_pattern"]))
  sliding = d.get("use_sliding_window")
  return ["sliding" if sliding and i >= d["max_window_layers"] else "full" for i in range(n)]


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """Our ModelConfig from a config.json dict (transformers 4.x or 5.x layout, Gemma 3 multimodal included)."""
  model_type, d = text_config(hf_config)
  family = _FAMILY[model_type]
  gemma = family.startswith("gemma")
  act_key, act = _ACTIVATION["gemma" if gemma else "qwen"]
  problems = [f"{act_key}={d[act_key]!r} (expected {act!r})"] if d.get(act_key, act) != act else []
  if d.get("attention_bias") and family != "qwen2":
    problems.append("attention_bias=True")
  if d.get("use_bidirectional_attention"):
    problems.append("use_bidirectional_attention=True")
  if problems:
    raise ValueError(f"config.json ({model_type}): unsupported {', '.join(problems)}")
  layer_types = _layer_types(d, model_type)
  window = d["sliding_window"] if gemma or d.get("use_sliding_window") else None
  if window is None or all(t == "full" for t in layer_types):
    layer_types = []
  full, local = _rope(d, "full_attention"), _rope(d, "sliding_attention")
  if "sliding" in layer_types and family != "gemma3" and (local != full):
    raise ValueError(f"config.json ({model_type}): sliding layers with rope {local} != full layers' {full}")
  if "sliding" in layer_types and local["scale"] != 1.0:
    raise ValueError(f"config.json ({model_type}): rope scaling on sliding layers is not supported")
  return ModelConfig(
      family=family, vocab_size=d["vocab_size"], embed_dim=d["hidden_size"], mlp_dim=d["intermediate_size"],
      num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
      num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
      head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"], norm_eps=d["rms_norm_eps"],
      rope_theta=full["theta"], rope_local_theta=local["theta"] if family == "gemma3" else None,
      rope_scale=full["scale"], query_pre_attn_scalar=d["query_pre_attn_scalar"] if gemma else None,
      attn_logit_softcap=d.get("attn_logit_softcapping") if family == "gemma2" else None,  # Gemma 3 ignores it
      final_logit_softcap=d.get("final_logit_softcapping") if gemma else None,
      sliding_window=window if layer_types else None, layer_types=tuple(layer_types),
      qkv_bias=family == "qwen2", qk_norm=family in ("gemma3", "qwen3"),
      tie_embeddings=bool(d["tie_word_embeddings"]))


def default_token_ids(cfg: ModelConfig) -> dict[str, Any]:
  """bos/eos/pad ids of the family's tokenizer (eos includes the chat end-of-turn token) when the vocab is its own."""
  if cfg.is_gemma:  # <end_of_turn> is 107 in Gemma 2's vocab, 106 in Gemma 3's
    end_of_turn = {"gemma2": 107, "gemma3": 106}[cfg.family] if cfg.vocab_size >= 256_000 else None
    return {"bos_token_id": 2, "eos_token_id": [1, end_of_turn] if end_of_turn else 1, "pad_token_id": 0}
  if cfg.vocab_size > 151_645:
    return {"bos_token_id": 151_643, "eos_token_id": [151_645, 151_643], "pad_token_id": 151_643}
  return {}


def _rope_dict(theta: float, scale: float) -> dict:
  if scale == 1.0:
    return {"rope_type": "default", "rope_theta": theta}
  return {"rope_type": "linear", "factor": scale, "rope_theta": theta}


def _effective(cfg: ModelConfig) -> dict:
  """The fields a config.json describes, with our "None = default" shorthands resolved."""
  d = dataclasses.asdict(cfg)
  for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention", "attention_block"):
    del d[k]
  d["layer_types"] = [cfg.layer_type(i) for i in range(cfg.num_layers)]
  d["sliding_window"] = cfg.sliding_window if "sliding" in d["layer_types"] else None
  d["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or cfg.head_dim
  d["rope_local_theta"] = cfg.rope_local_theta or cfg.rope_theta
  return d


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16", token_ids: Mapping[str, Any] | None = None) -> dict:
  """A config.json dict (transformers 5.x layout) for `cfg`; ValueError if HF cannot express some setting."""
  layer_types = [f"{cfg.layer_type(i)}_attention" for i in range(cfg.num_layers)]
  d = {"architectures": [_ARCHS[_MODEL_TYPE[cfg.family]]], "model_type": _MODEL_TYPE[cfg.family], "dtype": dtype,
       "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
       "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
       "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
       "tie_word_embeddings": cfg.tie_embeddings, "layer_types": layer_types, "sliding_window": cfg.sliding_window,
       **(default_token_ids(cfg) if token_ids is None else token_ids)}
  full = _rope_dict(cfg.rope_theta, cfg.rope_scale)
  if cfg.family == "gemma3":
    d["rope_parameters"] = {"sliding_attention": _rope_dict(cfg.rope_local_theta or cfg.rope_theta, 1.0),
                            "full_attention": full}
  else:
    d["rope_parameters"] = full
  if cfg.is_gemma:
    d.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
             query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
             attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap)
  else:
    d.update(hidden_act="silu", use_sliding_window="sliding_attention" in layer_types,
             max_window_layers=cfg.num_layers)
    if cfg.family == "qwen3":
      d["attention_bias"] = False
  back, want = _effective(config_from_hf(d)), _effective(cfg)
  lost = {k: want[k] for k in want if back[k] != want[k]}
  if lost:
    raise ValueError(f"a {d['model_type']} config.json cannot express {lost}")
  return d


def config_from_folder(hf_dir: str) -> ModelConfig:
  """Our ModelConfig from an HF folder's config.json."""
  return config_from_hf(read_json(os.path.join(hf_dir, "config.json")))


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e}); is the folder's download complete?") from None
