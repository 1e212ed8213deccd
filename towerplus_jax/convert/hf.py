"""Hugging Face (safetensors + config.json) <-> towerplus_jax conversion, driven by one key table per family.

Each table row is (HF tensor name, our parameter path, layout); `{i}` stands for the layer index, whose params live at
`layers.{i}` or, in a scanned model, in one row of a stacked array (models/layout.py). HF stores a Linear
weight as [out, in]; we store einsum layouts with the input axes first (q [D, N, H], o [N, H, D], gate [D, F]).
Norm weights are stored the same way on both sides (Gemma's (1 + w) convention is shared with HF).

    python -m towerplus_jax.convert.hf import --hf=HF_DIR --out=DIR       # DIR is a run workdir: init_from=ckpt:DIR
    python -m towerplus_jax.convert.hf export --workdir=DIR [--step=N] --out=HF_DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, Sharding
from safetensors import safe_open

from towerplus_jax import checkpoint, sharding, storage
from towerplus_jax.convert import hf_tokenizer
from towerplus_jax.data import chat
from towerplus_jax.data.tokenizers import CHAT_SYMBOLS, SentencePieceTokenizer, Tokenizer
from towerplus_jax.models import config as model_config
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.layout import layer_slot
from towerplus_jax.models.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------ layouts
@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our arrays is stored by HF. `same`: identical; `flat`: HF keeps it 1-D ([N, H] <-> [N*H]);
  `linear`: an nn.Linear weight [out, in] whose inputs are our first `n_in` axes (q [D,N,H] <-> [N*H, D])."""

  kind: Literal["same", "flat", "linear"]
  n_in: int = 1

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "same":
      return tuple(shape)
    if self.kind == "flat":
      return (math.prod(shape),)
    return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "same":
      return x
    if self.kind == "flat":
      return x.reshape(-1)
    return x.reshape(math.prod(x.shape[:self.n_in]), -1).T

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (x.T if self.kind == "linear" else x).reshape(shape)


SAME, FLAT, LINEAR, LINEAR2 = Layout("same"), Layout("flat"), Layout("linear", 1), Layout("linear", 2)

# ------------------------------------------------------------------------------------------------ key tables
_L, _O = "model.layers.{i}.", "layers.{i}."
_MODEL = (
    ("model.embed_tokens.weight", "embedder.table_VD", SAME),
    ("model.norm.weight", "final_norm.scale", SAME),
    ("lm_head.weight", "lm_head_DV", LINEAR),  # only untied models have it
)
_DECODER = (
    (_L + "input_layernorm.weight", _O + "pre_attn_norm.scale", SAME),
    (_L + "self_attn.q_proj.weight", _O + "attn.q_DNH", LINEAR),
    (_L + "self_attn.k_proj.weight", _O + "attn.k_DKH", LINEAR),
    (_L + "self_attn.v_proj.weight", _O + "attn.v_DKH", LINEAR),
    (_L + "self_attn.o_proj.weight", _O + "attn.o_NHD", LINEAR2),
    (_L + "mlp.gate_proj.weight", _O + "mlp.gate_DF", LINEAR),
    (_L + "mlp.up_proj.weight", _O + "mlp.up_DF", LINEAR),
    (_L + "mlp.down_proj.weight", _O + "mlp.down_FD", LINEAR),
)
_QWEN_NORMS = ((_L + "post_attention_layernorm.weight", _O + "pre_mlp_norm.scale", SAME),)
_GEMMA_NORMS = (
    (_L + "post_attention_layernorm.weight", _O + "post_attn_norm.scale", SAME),
    (_L + "pre_feedforward_layernorm.weight", _O + "pre_mlp_norm.scale", SAME),
    (_L + "post_feedforward_layernorm.weight", _O + "post_mlp_norm.scale", SAME),
)
_QKV_BIAS = (
    (_L + "self_attn.q_proj.bias", _O + "attn.q_bias_NH", FLAT),
    (_L + "self_attn.k_proj.bias", _O + "attn.k_bias_KH", FLAT),
    (_L + "self_attn.v_proj.bias", _O + "attn.v_bias_KH", FLAT),
)
_QK_NORM = (
    (_L + "self_attn.q_norm.weight", _O + "attn.q_norm.scale", SAME),
    (_L + "self_attn.k_norm.weight", _O + "attn.k_norm.scale", SAME),
)
TABLES = {
    "gemma2": _MODEL + _DECODER + _GEMMA_NORMS,
    "gemma3": _MODEL + _DECODER + _GEMMA_NORMS + _QK_NORM,
    "qwen2": _MODEL + _DECODER + _QWEN_NORMS + _QKV_BIAS,
    "qwen3": _MODEL + _DECODER + _QWEN_NORMS + _QK_NORM,
}
# HF tensors that carry no weights of the text decoder.
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^(model\.)?(vision_tower|multi_modal_projector)\.")


def key_map(cfg: ModelConfig, our_paths: set[str]) -> dict[str, tuple[str, int | None, Layout]]:
  """HF tensor name -> (our path, row of its stacked layer axis or None, layout) for every parameter of a model of
  `cfg` (rows it lacks are skipped)."""
  out = {}
  for hf, ours, layout in TABLES[cfg.family]:
    if "{i}" not in hf:
      rows = [(hf, ours, None)]
    else:
      rows = [(hf.format(i=i), slot + ours[len(_O) - 1:], row)
              for i in range(cfg.num_layers) for slot, row in [layer_slot(cfg, i)]]
    out.update({name: (path, row, layout) for name, path, row in rows if path in our_paths})
  uncovered = our_paths - {p for p, _, _ in out.values()}
  if uncovered:
    raise ValueError(f"no HF name for parameter(s) {sorted(uncovered)} of a {cfg.family} model")
  return out


# ------------------------------------------------------------------------------------------------ configs
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
    return ["sliding" if i % 2 == 0 else "full" for i in range(n)]
  if model_type == "gemma3_text":
    k = d["sliding_window_pattern"]
    return ["full" if (i + 1) % k == 0 else "sliding" for i in range(n)]
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


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e}); is the folder's download complete?") from None


# ------------------------------------------------------------------------------------------------ import
def _flatten(tree: Mapping) -> dict[str, tuple[tuple, Any]]:
  """{"layers.0.attn.q_DNH": (key path, leaf)} of a nested pure dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      for name, (path, leaf) in _flatten(value).items():
        out[f"{key}.{name}"] = ((key, *path), leaf)
    else:
      out[str(key)] = ((key,), value)
  return out


def _unflatten(items: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, value in items.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _weight_map(hf_dir: str) -> dict[str, str]:
  """HF tensor name -> safetensors file path, from the shard index or the single file."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index):
    return {k: os.path.join(hf_dir, v) for k, v in _read_json(index)["weight_map"].items()}
  single = os.path.join(hf_dir, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  with safe_open(single, framework="numpy") as f:
    return {k: single for k in f.keys()}


def _prefixes(weight_map: dict[str, str]) -> dict[str, str]:
  """Where the files keep our table's text-only names (Gemma 3 multimodal: `model.language_model.` etc.)."""
  for model, head in (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head.")):
    if model + "embed_tokens.weight" in weight_map:
      return {"model.": model, "lm_head.": head}
  return {"model.": "model.", "lm_head.": "lm_head."}


def _stored_name(name: str, prefixes: dict[str, str]) -> str:
  for ours, theirs in prefixes.items():
    if name.startswith(ours):
      return theirs + name[len(ours):]
  return name


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one of our parameters comes from: its HF tensors (one per stacked row, else one) and their files."""

  names: tuple[str, ...]
  files: tuple[str, ...]
  layout: Layout
  stacked: bool  # one HF tensor per row of our leading (layers) axis
  shape: tuple[int, ...]  # our shape of one row (stacked) or of the whole parameter
  # Tensors read so far (our layout), so that the per-device reads of one parameter read each file once;
  # `_place` empties it when the parameter is placed.
  cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def _tensor(self, k: int) -> np.ndarray:
    if k not in self.cache:
      # framework "flax" reads bfloat16 (numpy cannot); on the host, never through an accelerator
      with safe_open(self.files[k], framework="flax") as f, jax.default_device(_host_device()):
        x = np.asarray(f.get_tensor(self.names[k]))
      if not np.isfinite(x).all():
        raise ValueError(f"{self.files[k]}: tensor {self.names[k]} holds {np.size(x) - np.isfinite(x).sum()} "
                         "NaN/Inf values; the checkpoint is corrupt")
      self.cache[k] = self.layout.to_ours(x, self.shape)
    return self.cache[k]

  def read(self, index: tuple[slice, ...] = ()) -> np.ndarray:
    """The parameter (or the `index` part of it) in our layout; a stacked one reads only the rows it needs."""
    if not self.stacked:
      return self._tensor(0)[index]
    rows = range(len(self.names))[index[0] if index else slice(None)]
    return np.stack([self._tensor(k)[index[1:]] for k in rows])


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                       "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool"}


def _shape_and_dtype(file: str, name: str, hf_dir: str) -> tuple[tuple[int, ...], str]:
  """Shape and dtype of tensor `name` in `file`, or one error naming the file the index sent us to."""
  if not os.path.exists(file):
    raise FileNotFoundError(f"{hf_dir}: {INDEX_FILE} lists {os.path.basename(file)} (for {name}), which is missing")
  with safe_open(file, framework="numpy") as f:
    if name not in f.keys():
      raise ValueError(f"{hf_dir}: {INDEX_FILE} maps {name} to {os.path.basename(file)}, which does not hold it "
                       "(the shard index does not match the shards)")
    info = f.get_slice(name)
    dtype = info.get_dtype()
    return tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype.lower())


def hf_sources(hf_dir: str, cfg: ModelConfig, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, _Source]:
  """Our path -> its `_Source`, after checking names (missing / unexpected) and shapes against `targets`."""
  weight_map = _weight_map(hf_dir)
  prefixes = _prefixes(weight_map)
  table = {_stored_name(hf, prefixes): entry for hf, entry in key_map(cfg, set(targets)).items()}
  missing = sorted(n for n in table if n not in weight_map)
  if missing:
    files = sorted({os.path.basename(f) for f in weight_map.values()})
    raise ValueError(f"{hf_dir}: missing tensor(s) {missing} (a {cfg.family} model needs them; files: {files})")
  ignorable = (prefixes["lm_head."] + "weight",) if cfg.tie_embeddings else ()
  extra = sorted(n for n in weight_map if n not in table and n not in ignorable and not _IGNORABLE.search(n))
  if extra:
    raise ValueError(f"{hf_dir}: unexpected tensor(s) {extra} for a {cfg.family} model")
  by_path: dict[str, list[tuple[int, str]]] = {}
  for name, (path, row, _) in table.items():
    by_path.setdefault(path, []).append((row or 0, name))
  sources = {}
  for path, rows in by_path.items():
    names = tuple(name for _, name in sorted(rows))
    _, row, layout = table[names[0]]
    shape = targets[path].shape[1:] if row is not None else targets[path].shape
    for name in names:
      want, found, dtype = layout.hf_shape(shape), *_shape_and_dtype(weight_map[name], name, hf_dir)
      if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"{weight_map[name]}: tensor {name} is {dtype}, not floating-point weights")
      if want != found:
        raise ValueError(f"{weight_map[name]}: tensor {name} has shape {found}, expected {want} ({path} {shape})")
    sources[path] = _Source(names, tuple(weight_map[n] for n in names), layout, row is not None, tuple(shape))
  return sources


def _host_device() -> jax.Device | None:
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out: read onto the default device
    return None


def _place(source: _Source, target: jax.ShapeDtypeStruct, target_sharding: Sharding | None) -> jax.Array:
  """One parameter onto its sharding (else the default device), each device reading only its part."""
  try:
    if target_sharding is None:
      return jnp.asarray(source.read().astype(target.dtype))
    return jax.make_array_from_callback(target.shape, target_sharding,
                                        lambda index: source.read(index).astype(target.dtype))
  finally:
    source.cache.clear()


def load_hf(hf_dir: str, *, mesh: Mesh | None = None, rules: sharding.Rules = sharding.RULES,
            overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, Transformer]:
  """(ModelConfig, model) from an HF folder. The model is built abstractly and filled parameter by parameter, each
  placed straight onto its sharding on `mesh` (else the default device). `overrides`: ModelConfig fields such as
  dtype, param_dtype, remat, scan_layers."""
  cfg = config_from_hf(_read_json(os.path.join(hf_dir, "config.json"))).replace(**(overrides or {}))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  flat = _flatten(nnx.to_pure_dict(abstract))
  shardings = _flatten(nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))) if mesh else {}
  targets = {name: leaf for name, (_, leaf) in flat.items()}
  params = {flat[name][0]: _place(source, targets[name], shardings[name][1] if mesh else None)
            for name, source in hf_sources(hf_dir, cfg, targets).items()}
  nnx.replace_by_pure_dict(abstract, _unflatten(params))
  return cfg, nnx.merge(graphdef, abstract)


# ------------------------------------------------------------------------------------------------ export
def parse_size(size: str | int) -> int:
  """"5GB" -> 5e9 bytes, "2GiB" -> 2 * 2**30, "300KB", or a plain number of bytes."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
  if not m:
    raise ValueError(f"max_shard_size={size!r}: use e.g. '5GB', '500MB', '2GiB' or a number of bytes")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
  """Consecutive tensors grouped so that no group passes `limit` bytes (a bigger tensor gets its own group)."""
  groups, total = [[]], 0
  for name, size in sizes:
    if groups[-1] and total + size > limit:
      groups.append([])
      total = 0
    groups[-1].append(name)
    total += size
  return groups


def _to_host(x: jax.Array | np.ndarray) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _pure_params(params: nnx.Module | nnx.State | Mapping) -> Mapping:
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _export_file(name: str) -> bool:
  """Whether `name` is a file an HF export writes (and so one `overwrite` may replace)."""
  return (name in TOKENIZER_FILES or name in ("config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE)
          or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


def check_export_target(out_dir: str, overwrite: bool) -> None:
  """Refuse a non-empty `out_dir` unless `overwrite`, and even then unless it holds only an earlier export's files
  (a run workdir, checkpoints or anything else is never deleted)."""
  out = epath.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out={out_dir} is a file, not a folder")
  names = [p.name for p in out.iterdir()] if out.exists() else []
  if not names:
    return
  foreign = sorted(n for n in names if not _export_file(n))
  if foreign:
    raise FileExistsError(f"--out={out_dir} holds {foreign[:5]}, which an export did not write; choose an empty or "
                          "new folder (nothing was changed)")
  if not overwrite:
    raise FileExistsError(f"--out={out_dir} already holds an export; pass --overwrite to replace it, or choose "
                          "another folder (nothing was changed)")


def save_hf(params: nnx.Module | nnx.State | Mapping, cfg: ModelConfig, out_dir: str, *, dtype: str = "bfloat16",
            max_shard_size: str | int = "5GB", tokenizer_dir: str | None = None,
            generation_config: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
  """Write an HF folder (config.json, safetensors shards + index, generation_config.json, tokenizer files).

  `params`: a model, its nnx.State or the pure dict. Tensors are gathered to the host one at a time; only process 0
  writes, into `out_dir.tmp`, renamed to `out_dir` at the end. A non-empty `out_dir` is refused unless `overwrite`
  and it holds only an earlier export (`check_export_target`). `generation_config` defaults to the family's
  bos/eos/pad ids; its ids also go into config.json.
  """
  flat = _flatten(_pure_params(params))
  leaves = {name: leaf for name, (_, leaf) in flat.items()}
  table = key_map(cfg, set(leaves))
  np_dtype = np.dtype(jnp.dtype(dtype))
  def hf_shape(path: str, row: int | None, layout: Layout) -> tuple[int, ...]:
    return layout.hf_shape(leaves[path].shape[row is not None:])
  sizes = [(hf, math.prod(hf_shape(*entry)) * np_dtype.itemsize) for hf, entry in table.items()]
  groups = _shards(sizes, parse_size(max_shard_size))
  files = [SINGLE_FILE] if len(groups) == 1 else [
      f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
  writer = jax.process_index() == 0
  check_export_target(out_dir, overwrite)
  remote = not storage.is_local(out_dir)
  tmp = ""
  if writer:  # safetensors writes local files: a cloud export is staged on local disk and copied up at the end
    tmp = os.path.join(tempfile.mkdtemp(prefix="hf_export"), "out") if remote else out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  for file, names in zip(files, groups):
    tensors = {}
    for hf in names:
      path, row, layout = table[hf]
      leaf = leaves[path] if row is None else leaves[path][row]
      tensors[hf] = np.ascontiguousarray(layout.to_hf(_to_host(leaf)).astype(np_dtype))
    if writer:
      safetensors.numpy.save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
  if writer:
    gen = dict(default_token_ids(cfg) if generation_config is None else generation_config)
    token_ids = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
    _write_json(os.path.join(tmp, "config.json"), config_to_hf(cfg, dtype, token_ids))
    _write_json(os.path.join(tmp, "generation_config.json"), gen)
    if len(files) > 1:
      weight_map = {hf: file for file, names in zip(files, groups) for hf in names}
      _write_json(os.path.join(tmp, INDEX_FILE),
                  {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map})
    if tokenizer_dir:
      copy_tokenizer_files(tokenizer_dir, tmp)
    if remote:
      for stale in epath.Path(out_dir).glob("*") if epath.Path(out_dir).exists() else ():
        stale.unlink()  # an earlier export's files only (check_export_target)
      storage.mirror(tmp, out_dir)
      shutil.rmtree(os.path.dirname(tmp))
    else:
      shutil.rmtree(out_dir, ignore_errors=True)
      os.replace(tmp, out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("save_hf")


def _write_json(path: str | epath.Path, d: Mapping) -> None:
  epath.Path(path).write_text(json.dumps(d, indent=2))


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copy the tokenizer files present in `src_dir`; returns their names."""
  src, dst = epath.Path(src_dir), epath.Path(dst_dir)
  names = [n for n in TOKENIZER_FILES if (src / n).exists()]
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    (src / name).copy(dst / name, overwrite=True)
  return names


def chat_token_ids(tokenizer: Tokenizer, template: str) -> dict[str, Any]:
  """generation_config / config.json ids of a run's tokenizer: eos = the template's end-of-turn token, then eos
  (transformers `generate` stops at either), its bos and pad."""
  ids = {"eos_token_id": chat.stop_ids(tokenizer, template), "pad_token_id": tokenizer.pad_id}
  return ids if tokenizer.bos_id is None else {"bos_token_id": tokenizer.bos_id, **ids}


def write_tokenizer_config(tokenizer: Tokenizer, template: str, folder: str) -> None:
  """`folder/tokenizer_config.json` with the run's special tokens and chat template (and for a SentencePiece model
  without one, a `tokenizer.json` of the same ids), so that transformers' AutoTokenizer + apply_chat_template work on
  an export. An existing file is kept, only a missing chat template (and missing special tokens) added."""
  path = epath.Path(folder) / "tokenizer_config.json"
  config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
  if not config and isinstance(tokenizer, SentencePieceTokenizer):
    # A tokenizer.json of the same ids for the generic fast class: a family's own class would rebuild the vocabulary
    # its way (Qwen2Tokenizer as byte-level BPE, GemmaTokenizer with an extra <mask>).
    json_path = epath.Path(folder) / "tokenizer.json"
    if not json_path.exists():
      json_path.write_text(hf_tokenizer.sentencepiece_to_json(tokenizer.path, CHAT_SYMBOLS).to_str(), encoding="utf-8")
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False,
                  unk_token=tokenizer.piece(tokenizer.unk_id))
  for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id), ("pad_token", tokenizer.pad_id)):
    if i is not None:
      config.setdefault(name, tokenizer.piece(i))
  if "chat_template" not in config and not (epath.Path(folder) / "chat_template.jinja").exists():
    config["chat_template"] = chat.JINJA[template]
    config.setdefault("extra_special_tokens", [chat.START_OF_TURN[template], chat.END_OF_TURN[template]])
  _write_json(path, config)


def template_in(folder: str) -> str | None:
  """The chat template (chat.TEMPLATES) a tokenizer folder's Jinja template renders, by its end-of-turn token."""
  text = ""
  for name in ("tokenizer_config.json", "chat_template.jinja"):
    if (epath.Path(folder) / name).exists():
      text += (epath.Path(folder) / name).read_text(encoding="utf-8")
  return next((t for t in chat.TEMPLATES if chat.END_OF_TURN[t] in text), None)


# ------------------------------------------------------------------------------------------------ CLI
def import_to_workdir(hf_dir: str, out_dir: str, param_dtype: str = "float32") -> ModelConfig:
  """HF folder -> run-workdir layout: model_config.json, checkpoints/0/params (Orbax), tokenizer/. `out_dir` must be
  new or empty: an existing run is never overwritten."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"--out={out_dir} is not empty (it holds {sorted(os.listdir(out_dir))[:5]}); import into "
                          "a new folder (nothing was changed)")
  mesh = sharding.make_mesh({"fsdp": -1})
  cfg, model = load_hf(hf_dir, mesh=mesh, overrides={"param_dtype": param_dtype})
  checkpoint.save_params(os.path.join(out_dir, "checkpoints"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  if jax.process_index() == 0:
    model_config.save_json(cfg, out_dir)
    copy_tokenizer_files(hf_dir, os.path.join(out_dir, "tokenizer"))
  return cfg


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "bfloat16",
                   max_shard_size: str | int = "5GB", overwrite: bool = False) -> None:
  """A run workdir's (latest or given) checkpoint -> HF folder, tokenizer taken from `<workdir>/tokenizer`."""
  check_export_target(out_dir, overwrite)  # before the (long) restore
  cfg = model_config.load_json(workdir)
  mesh = sharding.make_mesh({"fsdp": -1})
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract),
                                    nnx.to_pure_dict(sharding.state_shardings(abstract, mesh)))
  params = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), target, step)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if not any((epath.Path(tokenizer_dir) / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
    save_hf(params, cfg, out_dir, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    return
  from towerplus_jax import setup_run  # (imports this module)
  tokenizer = setup_run.tokenizer_in(tokenizer_dir)
  template = template_in(tokenizer_dir) or chat.family_template(cfg.family)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{tokenizer_dir} has {tokenizer.vocab_size} ids, the model {cfg.vocab_size}")
  save_hf(params, cfg, out_dir, dtype=dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
          generation_config=chat_token_ids(tokenizer, template), overwrite=overwrite)
  if jax.process_index() == 0:
    write_tokenizer_config(tokenizer, template, out_dir)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m towerplus_jax.convert.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF folder -> workdir with an Orbax params checkpoint")
  imp.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
  imp.add_argument("--out", required=True, help="output workdir")
  imp.add_argument("--param_dtype", default="float32")
  exp = sub.add_parser("export", help="workdir checkpoint -> HF folder")
  exp.add_argument("--workdir", "--ckpt", dest="workdir", required=True, help="run workdir (or `import` output)")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  exp.add_argument("--out", required=True, help="output HF folder")
  exp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="weights dtype of the export (default bfloat16, as the published checkpoints)")
  exp.add_argument("--max_shard_size", default="5GB")
  exp.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (only that)")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      import_to_workdir(args.hf, args.out, args.param_dtype)
    else:
      export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  if args.command == "export":
    print(f"exported {args.workdir} to {args.out} in {args.dtype} (--dtype=float32 keeps full precision); "
          "generation_config.json stops at the chat template's end-of-turn token")


if __name__ == "__main__":
  main()
