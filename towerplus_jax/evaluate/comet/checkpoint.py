"""Read an unmodified COMET checkpoint folder: `hparams.yaml`, `checkpoints/model.ckpt` (a Lightning checkpoint,
read with `torch.load(weights_only=True)`: torch is an optional import, in the hf/test extras) and the encoder's
`config.json` + `tokenizer.json`, found at hparams' `pretrained_model` (a path, absolute or relative to the
checkpoint folder), else in the checkpoint folder itself, else in the Hugging Face cache (offline).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import yaml

from towerplus_jax.evaluate.comet.model import ENCODER_ACTIVATIONS, HEAD_ACTIVATIONS, CometConfig

CLASSES = {"regression_metric": "regression", "unified_metric": "unified", "xcomet_metric": "xcomet"}
_ENCODERS = ("XLM-RoBERTa", "XLM-RoBERTa-XL")
_POOLS = ("avg", "max", "cls", "default")
_TRANSFORMATIONS = ("softmax", "sparsemax", "sparsemax_patch")
_SEGMENTS = ("mt", "src", "ref")
_XCOMET_LABELS = ("minor", "major", "critical")  # XCOMETMetric asserts these

# Checkpoint state-dict name -> our parameter path ({0} = the name's first number), and how the tensor maps.
_T = "transpose"
_LAYER = r"encoder\.model\.encoder\.layer\.(\d+)\."
KEY_TABLE: tuple[tuple[str, str, str | None], ...] = (
    (r"encoder\.model\.embeddings\.word_embeddings\.weight", "encoder.word.embedding", None),
    (r"encoder\.model\.embeddings\.position_embeddings\.weight", "encoder.position.embedding", None),
    (r"encoder\.model\.embeddings\.token_type_embeddings\.weight", "encoder.token_type.embedding", None),
    (r"encoder\.model\.embeddings\.LayerNorm\.weight", "encoder.embed_norm.scale", None),
    (r"encoder\.model\.embeddings\.LayerNorm\.bias", "encoder.embed_norm.bias", None),
    (_LAYER + r"attention\.self\.query\.weight", "encoder.layers.{0}.query.kernel", _T),
    (_LAYER + r"attention\.self\.query\.bias", "encoder.layers.{0}.query.bias", None),
    (_LAYER + r"attention\.self\.key\.weight", "encoder.layers.{0}.key.kernel", _T),
    (_LAYER + r"attention\.self\.key\.bias", "encoder.layers.{0}.key.bias", None),
    (_LAYER + r"attention\.self\.value\.weight", "encoder.layers.{0}.value.kernel", _T),
    (_LAYER + r"attention\.self\.value\.bias", "encoder.layers.{0}.value.bias", None),
    (_LAYER + r"attention\.output\.dense\.weight", "encoder.layers.{0}.attn_out.kernel", _T),
    (_LAYER + r"attention\.output\.dense\.bias", "encoder.layers.{0}.attn_out.bias", None),
    (_LAYER + r"attention\.output\.LayerNorm\.weight", "encoder.layers.{0}.attn_norm.scale", None),
    (_LAYER + r"attention\.output\.LayerNorm\.bias", "encoder.layers.{0}.attn_norm.bias", None),
    (_LAYER + r"intermediate\.dense\.weight", "encoder.layers.{0}.up.kernel", _T),
    (_LAYER + r"intermediate\.dense\.bias", "encoder.layers.{0}.up.bias", None),
    (_LAYER + r"output\.dense\.weight", "encoder.layers.{0}.down.kernel", _T),
    (_LAYER + r"output\.dense\.bias", "encoder.layers.{0}.down.bias", None),
    (_LAYER + r"output\.LayerNorm\.weight", "encoder.layers.{0}.mlp_norm.scale", None),
    (_LAYER + r"output\.LayerNorm\.bias", "encoder.layers.{0}.mlp_norm.bias", None),
    # XLM-R XL/XXL: pre-LN norms and the encoder's final LayerNorm.
    (_LAYER + r"attention\.self_attn_layer_norm\.weight", "encoder.layers.{0}.attn_norm.scale", None),
    (_LAYER + r"attention\.self_attn_layer_norm\.bias", "encoder.layers.{0}.attn_norm.bias", None),
    (_LAYER + r"LayerNorm\.weight", "encoder.layers.{0}.mlp_norm.scale", None),
    (_LAYER + r"LayerNorm\.bias", "encoder.layers.{0}.mlp_norm.bias", None),
    (r"encoder\.model\.encoder\.LayerNorm\.weight", "encoder.final_norm.scale", None),
    (r"encoder\.model\.encoder\.LayerNorm\.bias", "encoder.final_norm.bias", None),
    (r"layerwise_attention\.scalar_parameters\.(\d+)", "mix.weights_L.{0}", "scalar"),  # one entry of weights_L
    (r"layerwise_attention\.gamma", "mix.gamma", "scalar"),
    # FeedForward's nn.Sequential: Linear, activation, Dropout per hidden layer, so Linear k sits at index 3k.
    (r"estimator\.ff\.(\d+)\.weight", "estimator.linears.{0}.kernel", _T),
    (r"estimator\.ff\.(\d+)\.bias", "estimator.linears.{0}.bias", None),
    (r"hidden2tag\.weight", "hidden2tag.kernel", _T),  # xCOMET's token tagger
    (r"hidden2tag\.bias", "hidden2tag.bias", None),
)
# Not used at inference: dropout buffers of the layer mix, the unused pooler, the word-level loss weights.
_IGNORED = re.compile(r"layerwise_attention\.dropout_(mask|fill)$|\.pooler\.|position_ids$|^wordloss\.")


class CometCheckpointError(ValueError):
  """A COMET folder that cannot be read; the message is one line naming the file and what to do."""


def checkpoint_files(path: str) -> tuple[str, str]:
  """(model.ckpt, hparams.yaml) of a COMET folder (or of its checkpoints/model.ckpt)."""
  ckpt = path if os.path.isfile(path) else os.path.join(path, "checkpoints", "model.ckpt")
  if not os.path.isfile(ckpt):
    raise CometCheckpointError(f"no COMET checkpoint at {ckpt}: give the model folder holding "
                               "checkpoints/model.ckpt and hparams.yaml (e.g. a download of Unbabel/wmt22-comet-da)")
  hparams = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "hparams.yaml")
  if not os.path.isfile(hparams):
    raise CometCheckpointError(f"{hparams} is missing: a COMET folder has hparams.yaml next to checkpoints/")
  return ckpt, hparams


def read_hparams(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      hparams = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise CometCheckpointError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
  if not isinstance(hparams, dict) or "class_identifier" not in hparams:
    raise CometCheckpointError(f"{path}: no class_identifier; is this a COMET hparams.yaml?")
  if hparams["class_identifier"] not in CLASSES:
    raise CometCheckpointError(f"{path}: class_identifier {hparams['class_identifier']!r} is not supported "
                               f"(supported: {sorted(CLASSES)})")
  if hparams.get("encoder_model", "XLM-RoBERTa") not in _ENCODERS:
    raise CometCheckpointError(f"{path}: encoder_model {hparams['encoder_model']!r} is not supported "
                               f"(supported: {list(_ENCODERS)})")
  return hparams


def encoder_folder(pretrained_model: str, model_dir: str) -> str:
  """The folder with the encoder's config.json and tokenizer.json."""
  candidates = [os.path.normpath(os.path.join(model_dir, pretrained_model)), model_dir]
  try:
    from huggingface_hub import snapshot_download
    candidates.append(snapshot_download(pretrained_model, local_files_only=True))
  except Exception:  # not installed, not a repo name, or not in the cache
    pass
  for folder in candidates:
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "tokenizer.json")):
      return folder
  raise CometCheckpointError(
      f"no encoder config.json + tokenizer.json for pretrained_model {pretrained_model!r} (looked in "
      f"{', '.join(candidates)}): copy the encoder's config.json and tokenizer.json (e.g. from xlm-roberta-large) "
      f"into {model_dir}")


def _refuse(path: str, key: str, value, allowed: Sequence[str] | str) -> CometCheckpointError:
  """One line: the file, key=value, what is allowed, and the closest allowed name."""
  names = {} if isinstance(allowed, str) else {str(a).lower(): a for a in allowed}
  close = difflib.get_close_matches(str(value).lower(), names, n=1)
  hint = f"; did you mean {names[close[0]]!r}?" if close else ""
  allowed = allowed if isinstance(allowed, str) else f"one of {', '.join(allowed)}"
  return CometCheckpointError(f"{path}: {key}={value!r} is not supported: must be {allowed}{hint}")


# unbabel-comet 2.2.7's constructor defaults per class, for keys an hparams.yaml leaves out.
_DEFAULTS = dict(pool="avg", layer="mix", sent_layer="mix", layer_transformation="softmax", layer_norm=True,
                 hidden_sizes=[3072, 1024], activations="Tanh", final_activation=None, input_segments=list(_SEGMENTS),
                 word_level_training=False, error_labels=["minor", "major"], word_layer=24)
_CLASS_DEFAULTS = {"regression": {}, "unified": dict(layer_transformation="sparsemax"),
                   "xcomet": dict(layer_transformation="sparsemax", layer_norm=False, hidden_sizes=[2560, 1280],
                                  word_level_training=True, error_labels=list(_XCOMET_LABELS), word_layer=36)}


def _check_hparams(hp: Mapping, path: str, kind: str, num_layers: int, word_level: bool) -> None:
  """Refuse at load what COMET would refuse (or silently misread) at its first forward: pooling, layer indices,
  layer mix, head sizes and activations, input segments, the tagger's labels."""
  def layer_ok(v) -> bool:
    return v == "mix" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= num_layers)

  def check(key: str, ok: bool, allowed: Sequence[str] | str) -> None:
    if not ok:
      raise _refuse(path, key, hp[key], allowed)

  layer_key = "layer" if kind == "regression" else "sent_layer"
  check(layer_key, layer_ok(hp[layer_key]), f"'mix' or a hidden-state index 0..{num_layers}")
  if hp[layer_key] == "mix":
    check("layer_transformation", hp["layer_transformation"] in _TRANSFORMATIONS, _TRANSFORMATIONS)
    check("layer_norm", isinstance(hp["layer_norm"], bool), "true or false")
  if kind == "regression":
    check("pool", hp["pool"] in _POOLS, _POOLS)
  sizes = hp["hidden_sizes"]
  check("hidden_sizes", isinstance(sizes, list) and bool(sizes) and all(
      isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes), "a non-empty list of positive ints")
  for key in ("activations", "final_activation"):
    value = hp[key]
    check(key, (value is None and key == "final_activation") or (
        isinstance(value, str) and value.title() in HEAD_ACTIVATIONS), tuple(HEAD_ACTIVATIONS))
  if kind == "unified":
    segments = hp["input_segments"]
    check("input_segments", isinstance(segments, list) and set(segments) <= set(_SEGMENTS) and
          len(set(segments)) == len(segments), f"a list of distinct names among {', '.join(_SEGMENTS)}")
    check("word_level_training", isinstance(hp["word_level_training"], bool), "true or false")
  if word_level:
    check("word_layer", layer_ok(hp["word_layer"]) and hp["word_layer"] != "mix",
          f"a hidden-state index 0..{num_layers}")
    labels = hp["error_labels"]
    if kind == "xcomet":
      check("error_labels", labels == list(_XCOMET_LABELS), f"[{', '.join(_XCOMET_LABELS)}] (XCOMETMetric)")
    check("error_labels", isinstance(labels, list) and bool(labels) and all(isinstance(x, str) for x in labels),
          "a non-empty list of severity names")


def config_from(hparams: Mapping, hparams_path: str, encoder_config_path: str, dtype: str = "float32") -> CometConfig:
  """The model's config from hparams.yaml (COMET's defaults for keys it leaves out) and the encoder's config.json;
  anything we would not run as COMET does is refused here, at load, in one line naming the file and key."""
  with open(encoder_config_path, encoding="utf-8") as f:
    enc = json.load(f)
  kind = CLASSES[hparams["class_identifier"]]
  hp = {**_DEFAULTS, **_CLASS_DEFAULTS[kind], **hparams}
  word_level = kind == "xcomet" or hp["word_level_training"] is True  # XCOMETMetric always tags
  _check_hparams(hp, hparams_path, kind, enc["num_hidden_layers"], word_level)
  hidden_act = enc.get("hidden_act", "gelu")
  if hidden_act not in ENCODER_ACTIVATIONS:
    raise _refuse(encoder_config_path, "hidden_act", hidden_act, tuple(ENCODER_ACTIVATIONS))
  # unbabel-comet >= 2.2.4 reads the xCOMET-era "sparsemax_patch" as softmax (its issue #244).
  transformation = "softmax" if hp["layer_transformation"] == "sparsemax_patch" else hp["layer_transformation"]
  return CometConfig(
      kind=kind, vocab_size=enc["vocab_size"], hidden_size=enc["hidden_size"],
      num_layers=enc["num_hidden_layers"], num_heads=enc["num_attention_heads"],
      intermediate_size=enc["intermediate_size"], max_position_embeddings=enc["max_position_embeddings"],
      type_vocab_size=enc.get("type_vocab_size", 1), layer_norm_eps=enc.get("layer_norm_eps", 1e-5),
      pad_id=enc.get("pad_token_id", 1), hidden_act=hidden_act, pre_ln=hp.get("encoder_model") == "XLM-RoBERTa-XL",
      layer=hp["layer" if kind == "regression" else "sent_layer"], layer_transformation=transformation,
      layer_norm=hp["layer_norm"], pool=hp["pool"], hidden_sizes=tuple(hp["hidden_sizes"]),
      activations=hp["activations"], final_activation=hp["final_activation"],
      input_segments=_SEGMENTS if kind == "xcomet" else tuple(hp["input_segments"]), word_level=word_level,
      error_labels=tuple(hp["error_labels"]) if word_level else (), word_layer=hp["word_layer"], dtype=dtype)


def read_state_dict(ckpt: str) -> dict[str, Callable[[], np.ndarray]]:
  """The Lightning checkpoint's state_dict, each tensor read (as float32 numpy) only when its thunk is called: the
  file is memory-mapped (weights_only=True: tensors only), so no more than one tensor is in memory at a time. A file
  in torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped: it is read whole."""
  try:
    import torch
  except ImportError:
    raise ImportError("reading a COMET model.ckpt needs torch: pip install 'towerplus_jax[hf]' (or torch)") from None
  try:
    ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(ckpt))
  except Exception as e:
    raise CometCheckpointError(f"{ckpt}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]})") from None
  state = ckpt_dict.get("state_dict") if isinstance(ckpt_dict, dict) else None
  if not isinstance(state, dict):
    raise CometCheckpointError(f"{ckpt}: no state_dict in the checkpoint")
  return {k: (lambda v=v: v.float().numpy()) for k, v in state.items() if hasattr(v, "numpy")}


def _target(name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
  for pattern, path, how in KEY_TABLE:
    m = re.fullmatch(pattern, name)
    if m:
      numbers = [int(g) for g in m.groups()]
      if path.startswith("estimator."):
        numbers = [n // 3 for n in numbers]
      fn = {None: lambda x: x, _T: lambda x: x.T, "scalar": lambda x: x.reshape(())}[how]
      return path.format(*numbers), fn
  return None


def convert(state: Mapping[str, Callable[[], np.ndarray]], ckpt: str) -> dict[str, Callable[[], np.ndarray]]:
  """Our {"encoder.layers.0.query.kernel": thunk of its array, ...} from the checkpoint's lazy state dict (layer-mix
  weights gathered into one vector)."""
  out: dict[str, Callable[[], np.ndarray]] = {}
  mix: dict[int, Callable[[], np.ndarray]] = {}
  for name, read in state.items():
    if _IGNORED.search(name):
      continue
    target = _target(name)
    if target is None:
      raise CometCheckpointError(f"{ckpt}: unexpected tensor {name!r} (not an XLM-R COMET model?)")
    path, fn = target
    thunk = lambda read=read, fn=fn: fn(read())
    if path.startswith("mix.weights_L."):
      mix[int(path.rsplit(".", 1)[1])] = thunk
    else:
      out[path] = thunk
  if mix:
    out["mix.weights_L"] = lambda: np.stack([mix[i]() for i in range(len(mix))])
  return out
