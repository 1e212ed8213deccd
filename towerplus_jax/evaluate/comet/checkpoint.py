"""Read an unmodified COMET checkpoint folder: `hparams.yaml`, `checkpoints/model.ckpt` (a Lightning checkpoint,
read with `torch.load(weights_only=True)`: torch is an optional import, in the hf/test extras) and the encoder's
`config.json` + `tokenizer.json`, found at hparams' `pretrained_model` (a path, absolute or relative to the
checkpoint folder), else in the checkpoint folder itself, else in the Hugging Face cache (offline).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping

import numpy as np
import yaml

from towerplus_jax.evaluate.comet.model import CometConfig

CLASSES = {"regression_metric": "regression", "unified_metric": "unified", "xcomet_metric": "xcomet"}
_ENCODERS = ("XLM-RoBERTa", "XLM-RoBERTa-XL")

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
  candidates = [pretrained_model if os.path.isabs(pretrained_model) else os.path.join(model_dir, pretrained_model),
                model_dir]
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


def config_from(hparams: Mapping, encoder_config_path: str, dtype: str = "float32") -> CometConfig:
  with open(encoder_config_path, encoding="utf-8") as f:
    enc = json.load(f)
  kind = CLASSES[hparams["class_identifier"]]
  transformation = hparams.get("layer_transformation", "softmax")
  # unbabel-comet >= 2.2.4 reads the xCOMET-era "sparsemax_patch" as softmax (its issue #244).
  transformation = "softmax" if transformation == "sparsemax_patch" else transformation
  layer = hparams.get("layer" if kind == "regression" else "sent_layer", "mix")
  xcomet = kind == "xcomet"
  return CometConfig(
      kind=kind, vocab_size=enc["vocab_size"], hidden_size=enc["hidden_size"],
      num_layers=enc["num_hidden_layers"], num_heads=enc["num_attention_heads"],
      intermediate_size=enc["intermediate_size"], max_position_embeddings=enc["max_position_embeddings"],
      type_vocab_size=enc.get("type_vocab_size", 1), layer_norm_eps=enc.get("layer_norm_eps", 1e-5),
      pad_id=enc.get("pad_token_id", 1), hidden_act=enc.get("hidden_act", "gelu"),
      pre_ln=hparams.get("encoder_model") == "XLM-RoBERTa-XL",
      layer=layer, layer_transformation=transformation,
      layer_norm=bool(hparams.get("layer_norm", kind == "unified")), pool=hparams.get("pool", "avg"),
      hidden_sizes=tuple(hparams.get("hidden_sizes", (3072, 1024))), activations=hparams.get("activations", "Tanh"),
      final_activation=hparams.get("final_activation"),
      input_segments=("mt", "src", "ref") if xcomet else tuple(hparams.get("input_segments", ("mt", "src", "ref"))),
      error_labels=tuple(hparams.get("error_labels", ("minor", "major", "critical"))) if xcomet else (),
      word_layer=int(hparams.get("word_layer", 36)) if xcomet else 24, dtype=dtype)


def read_state_dict(ckpt: str) -> dict[str, Callable[[], np.ndarray]]:
  """The Lightning checkpoint's state_dict, each tensor read (as float32 numpy) only when its thunk is called: the
  file is memory-mapped (weights_only=True: tensors only), so no more than one tensor is in memory at a time."""
  try:
    import torch
  except ImportError:
    raise ImportError("reading a COMET model.ckpt needs torch: pip install 'towerplus_jax[hf]' (or torch)") from None
  try:
    ckpt_dict = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
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
