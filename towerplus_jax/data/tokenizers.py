"""Tokenizers behind one small protocol: SentencePiece (Gemma's `tokenizer.model`) and HF `tokenizers` (Qwen's
`tokenizer.json`), plus a tiny SentencePiece model trained from the shipped sample for the embedded default."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Protocol

import sentencepiece as spm
from etils import epath
import tokenizers as hf_tokenizers

from towerplus_jax.data.sources import SAMPLE_DIR
CHAT_SYMBOLS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>")
SAMPLE_VOCAB_SIZE = 1024
SAMPLE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "towerplus_jax")  # where `sample` is trained once


class Tokenizer(Protocol):
  """What the data pipeline, the sampler and evaluation need from a tokenizer."""
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens (bos/eos/pad, chat markers) are left out."""

  def token_id(self, piece: str) -> int:
    """Id of a special piece such as '<end_of_turn>'; KeyError when the vocabulary lacks it."""

  def piece(self, token_id: int) -> str:
    """The vocabulary entry of `token_id` (e.g. '<eos>')."""


class SentencePieceTokenizer:
  """A SentencePiece model file (Gemma-style ids: pad 0, eos 1, bos 2)."""

  def __init__(self, model_path: str):
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=epath.Path(model_path).read_bytes())
    self.vocab_size = self._sp.GetPieceSize()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.unk_id = self._sp.unk_id()
    chat = [self._sp.PieceToId(p) for p in CHAT_SYMBOLS if self._sp.PieceToId(p) != self._sp.unk_id()]
    self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id, *chat) if i is not None}

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids if int(i) not in self._special])

  def token_id(self, piece: str) -> int:
    i = self._sp.PieceToId(piece)
    if i == self._sp.unk_id() and piece != self._sp.IdToPiece(i):
      raise KeyError(f"{self.path}: no token {piece!r} in the vocabulary")
    return i

  def piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(token_id)


class HFTokenizer:
  """A Hugging Face `tokenizer.json`. Special ids come from a sibling `tokenizer_config.json` when there is one,
  else from the json's added tokens (`<bos>`/`<s>`, `<eos>`/`</s>`/`<|endoftext|>`, `<pad>`); bos may be None."""

  BOS = ("<bos>", "<s>", "<|begin_of_text|>")
  EOS = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")
  PAD = ("<pad>", "<|endoftext|>", "<|finetune_right_pad_id|>")

  def __init__(self, tokenizer_json_path: str):
    self.path = tokenizer_json_path
    text = epath.Path(tokenizer_json_path).read_text(encoding="utf-8")
    self._tok = hf_tokenizers.Tokenizer.from_str(text)
    added = {t["content"]: t["id"] for t in json.loads(text).get("added_tokens", [])}
    config = _read_tokenizer_config(os.path.join(os.path.dirname(tokenizer_json_path), "tokenizer_config.json"))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._special_id(config.get("bos_token"), added, self.BOS)
    eos_id = self._special_id(config.get("eos_token"), added, self.EOS)
    if eos_id is None:
      raise ValueError(f"{tokenizer_json_path}: no eos token (none of {self.EOS}, no eos_token in tokenizer_config)")
    self.eos_id = eos_id
    pad_id = self._special_id(config.get("pad_token"), added, self.PAD)
    self.pad_id = self.eos_id if pad_id is None else pad_id

  def _special_id(self, configured: str | dict | None, added: dict[str, int], candidates: tuple[str, ...]):
    if isinstance(configured, dict):
      configured = configured.get("content")
    if configured:
      return self.token_id(configured)
    return next((added[c] for c in candidates if c in added), None)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    if i is None:
      raise KeyError(f"{self.path}: no token {piece!r} in the vocabulary")
    return i

  def piece(self, token_id: int) -> str:
    return self._tok.id_to_token(token_id)


def _read_tokenizer_config(path: str) -> dict:
  if not epath.Path(path).exists():
    return {}
  return json.loads(epath.Path(path).read_text(encoding="utf-8"))


def load_tokenizer(kind: str, path: str) -> Tokenizer:
  """kind: 'sentencepiece' (a `.model` file) or 'hf' (a `tokenizer.json`)."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if kind == "hf":
    return HFTokenizer(path)
  raise ValueError(f"tokenizer kind {kind!r}: use 'sentencepiece' or 'hf'")


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        user_defined_symbols: Iterable[str] = CHAT_SYMBOLS) -> str:
  """Train a Gemma-like BPE model (pad 0, eos 1, bos 2, unk 3, byte fallback, no normalisation) and write
  `{model_prefix}.model` atomically; returns that path. The vocabulary may come out smaller for a tiny corpus."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
      unk_piece="<unk>", user_defined_symbols=list(user_defined_symbols), byte_fallback=True,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, character_coverage=0.9995,
      num_threads=1, minloglevel=2)
  path = model_prefix + ".model"
  _atomic_write(path, model.getvalue())
  return path


def _atomic_write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _strings(value) -> Iterator[str]:
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)


def sample_texts(sample_dir: str = SAMPLE_DIR) -> list[str]:
  """Every string value of every record in `sample_dir/*.jsonl`."""
  texts = []
  for path in sorted(glob.glob(os.path.join(sample_dir, "*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      texts.extend(t for line in f if line.strip() for t in _strings(json.loads(line)))
  return texts


def sample_tokenizer(cache_dir: str, vocab_size: int = SAMPLE_VOCAB_SIZE, sample_dir: str = SAMPLE_DIR) -> str:
  """Path of a SentencePiece model trained once on the shipped sample (cached under `cache_dir`, keyed by a hash
  of the sample and the vocabulary size) with the Gemma and ChatML chat markers and '\\n' as single tokens."""
  texts = sample_texts(sample_dir)
  if not texts:
    raise FileNotFoundError(f"no sample text in {sample_dir}/*.jsonl to train the sample tokenizer on")
  digest = hashlib.sha256(json.dumps([vocab_size, texts]).encode()).hexdigest()[:12]
  prefix = os.path.join(cache_dir, f"sample_sp_{digest}")
  if os.path.exists(prefix + ".model"):
    return prefix + ".model"
  return train_sentencepiece(texts, prefix, vocab_size, (*CHAT_SYMBOLS, "\n"))

