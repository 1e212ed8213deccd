"""A run's tokenizer: resolved from its config (data.tokenizer, data.template, init_from) and copied into the run
folder, and the tokenizer files a run or HF folder keeps (found, read back, copied; tokenizer_config.json with the
chat template written so that transformers' AutoTokenizer works on an export)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
from etils import epath

from towerplus_jax.config import config_check
from towerplus_jax.convert import hf_config, hf_tokenizer, peft
from towerplus_jax.data import chat
from towerplus_jax.data.tokenizers import (
  CHAT_SYMBOLS,
  SAMPLE_CACHE,
  SentencePieceTokenizer,
  Tokenizer,
  load_tokenizer,
  sample_tokenizer,
)
from towerplus_jax.models import config as model_config

MODEL_FILES = {"sp": "tokenizer.model", "hf": "tokenizer.json"}  # tokenizer spec prefix -> its file in a folder
SPEC_KINDS = {"sp": "sentencepiece", "hf": "hf"}  # tokenizer spec prefix -> `load_tokenizer` kind
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(src_dir: str, dst_dir: str, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
  """Copy those of `names` (default: every tokenizer file) present in `src_dir`; returns their names."""
  src, dst = epath.Path(src_dir), epath.Path(dst_dir)
  names = [n for n in names if (src / n).exists()]
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    (src / name).copy(dst / name, overwrite=True)
  return names


def tokenizer_spec(folder: str) -> str:
  """'sp:FOLDER/tokenizer.model' or 'hf:FOLDER/tokenizer.json', whichever `folder` holds (in that order)."""
  for kind, name in MODEL_FILES.items():
    if (epath.Path(folder) / name).exists():
      return f"{kind}:{os.path.join(folder, name)}"
  raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}")


def tokenizer_in(folder: str) -> Tokenizer:
  """The tokenizer saved in a run's `tokenizer/` folder or shipped in an HF folder."""
  kind, _, path = tokenizer_spec(folder).partition(":")
  return load_tokenizer(SPEC_KINDS[kind], path)


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
  path.write_text(json.dumps(config, indent=2))


def template_in(folder: str) -> str | None:
  """The chat template (chat.TEMPLATES) a tokenizer folder's Jinja template renders, by its end-of-turn token."""
  text = ""
  for name in ("tokenizer_config.json", "chat_template.jinja"):
    if (epath.Path(folder) / name).exists():
      text += (epath.Path(folder) / name).read_text(encoding="utf-8")
  return next((t for t in chat.TEMPLATES if chat.END_OF_TURN[t] in text), None)


def init_folder(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
  """(config.init_from's tokenizer folder, init kind 'hf' | 'ckpt'), or None for a random init (an adapter's: its
  base HF folder's)."""
  if not config.init_from:
    return None
  kind, path = config_check.init_source(config.init_from)
  if kind == "peft":
    return peft.read_adapter(path)[1], "hf"
  return (path if kind == "hf" else os.path.join(path, "tokenizer")), kind


def resolve_template(config: ml_collections.ConfigDict) -> str:
  """config.data.template, 'auto' resolved: the chat template of init_from's tokenizer folder when it has one, else
  the model family's (gemma for Gemma, chatml for Qwen)."""
  if config.data.template != "auto":
    return config.data.template
  found = init_folder(config)
  if found and template_in(found[0]):
    return template_in(found[0])
  if not found:
    family = model_config.preset(config.model.preset).family
  elif found[1] == "hf":
    family = hf_config.config_from_folder(found[0]).family
  else:
    family = model_config.load_json(os.path.dirname(found[0])).family
  return chat.family_template(family)


def load_for_run(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """`resolve_for_run`, then its files copied to WORKDIR/tokenizer (`save_for_run`)."""
  tok, spec = resolve_for_run(config)
  save_for_run(config, tok, spec, workdir)
  return tok


def resolve_for_run(config: ml_collections.ConfigDict) -> tuple[Tokenizer, str]:
  """(tokenizer, 'sp:PATH' | 'hf:PATH') of config.data.tokenizer: 'sample' | 'sp:PATH' | 'hf:PATH' | 'auto'
  (init_from's folder; the sample tokenizer for a random-init tiny preset). Writes nothing to the run folder
  (`save_for_run` does, once the run is known to be valid). Resolves config.data.template='auto' in place (the
  pipeline and rollouts read it)."""
  config.data.template = resolve_template(config)
  spec = config.data.tokenizer
  if spec == "auto":
    found = init_folder(config)
    if found and any((epath.Path(found[0]) / n).exists() for n in MODEL_FILES.values()):
      spec = tokenizer_spec(found[0])
    elif config.model.preset.startswith("tiny"):
      spec = "sample"
    else:
      raise ValueError("config.data.tokenizer='auto' needs config.init_from (hf:DIR or ckpt:WORKDIR); with a random "
                       "init set config.data.tokenizer=sample, sp:PATH or hf:PATH")
  if spec == "sample":
    spec = f"sp:{sample_tokenizer(SAMPLE_CACHE)}"
  kind, _, path = spec.partition(":")
  if kind not in SPEC_KINDS:
    raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r}: use sample, sp:PATH, hf:PATH or auto")
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"config.data.tokenizer={config.data.tokenizer!r}: tokenizer file {path} does not exist")
  return load_tokenizer(SPEC_KINDS[kind], path), spec


def save_for_run(config: ml_collections.ConfigDict, tok: Tokenizer, spec: str, workdir: str) -> None:
  """A copy of the tokenizer files of `spec` (from `resolve_for_run`) in WORKDIR/tokenizer, so that export and
  evaluation find it, with the run's chat template (process 0 only)."""
  if jax.process_index() != 0:
    return
  kind, _, path = spec.partition(":")
  dst, src = epath.Path(workdir) / "tokenizer", epath.Path(path)
  dst.mkdir(parents=True, exist_ok=True)
  src.copy(dst / MODEL_FILES[kind], overwrite=True)
  copy_tokenizer_files(str(src.parent), str(dst), [n for n in TOKENIZER_FILES if n not in MODEL_FILES.values()])
  write_tokenizer_config(tok, config.data.template, str(dst))  # the run's chat template travels to an export
