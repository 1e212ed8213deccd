"""Tokenizers: the SentencePiece wrapper against sentencepiece itself, the HF wrapper against transformers' own
loading of the same files (Gemma converted from our SentencePiece model, and a Qwen-style byte-level BPE), and the
cached sample tokenizer."""
import json
import os
import shutil

import pytest
import sentencepiece as spm
import tokenizers as hf

from towerplus_jax.data import tokenizers

TEXTS = ["Hello world! This is an English sentence.", "Olá mundo! Isto é uma frase em português.",
         "Guten Tag, wie geht es Ihnen?", "你好，世界。", "Привет, мир!"] * 10
PROBES = ["Hello  world!\n Olá 123", "Unseen ✓ characters ÿ 😀", "你好 мир"]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  return tokenizers.train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("sp") / "sp"), 400)


def test_sentencepiece_matches_sentencepiece(sp_path):
  tok = tokenizers.load_tokenizer("sentencepiece", sp_path)
  ref = spm.SentencePieceProcessor(model_file=sp_path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert [ref.IdToPiece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert tok.vocab_size == ref.GetPieceSize()
  for text in PROBES:
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text  # identity normalisation + byte fallback: lossless
  for piece in tokenizers.CHAT_SYMBOLS:
    assert ref.IdToPiece(tok.token_id(piece)) == piece
    assert tok.encode(piece) == [tok.token_id(piece)]
  with pytest.raises(KeyError, match="no token"):
    tok.token_id("<not_a_piece>")
  hello = tok.encode("Hello")
  assert tok.decode([tok.bos_id, tok.token_id("<start_of_turn>"), *hello, tok.token_id("<end_of_turn>"),
                     tok.eos_id, tok.pad_id]) == "Hello"


def test_hf_tokenizer_matches_transformers_gemma_conversion(sp_path, tmp_path):
  transformers = pytest.importorskip("transformers")
  sp_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
  sp_dir.mkdir()
  shutil.copy(sp_path, sp_dir / "tokenizer.model")
  transformers.GemmaTokenizer.from_pretrained(str(sp_dir)).save_pretrained(str(hf_dir))
  ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  tok = tokenizers.load_tokenizer("hf", str(hf_dir / "tokenizer.json"))
  sp = tokenizers.load_tokenizer("sentencepiece", sp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (2, 1, 0)
  for text in PROBES:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text
  assert tok.token_id("<end_of_turn>") == sp.token_id("<end_of_turn>")


def _qwen_like(folder, config: dict | None):
  model = hf.Tokenizer(hf.models.BPE())
  model.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = hf.decoders.ByteLevel()
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  model.train_from_iterator(TEXTS, hf.trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                          initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(folder, exist_ok=True)
  model.save(os.path.join(folder, "tokenizer.json"))
  if config is not None:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
  return os.path.join(folder, "tokenizer.json")


def test_hf_tokenizer_qwen_style_special_ids(tmp_path):
  bare = tokenizers.load_tokenizer("hf", _qwen_like(tmp_path / "bare", None))
  assert bare.bos_id is None
  assert bare.eos_id == bare.pad_id == bare.token_id("<|endoftext|>") == 0
  transformers = pytest.importorskip("transformers")
  folder = tmp_path / "instruct"
  path = _qwen_like(folder, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  tok = tokenizers.load_tokenizer("hf", path)
  ref = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
  for text in PROBES:
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text
  with pytest.raises(KeyError, match="no token"):
    tok.token_id("<end_of_turn>")


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizers.load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
  (tmp_path / "x.model").write_bytes(b"")
  with pytest.raises(ValueError, match="kind"):
    tokenizers.load_tokenizer("bpe", str(tmp_path / "x.model"))


def test_sample_tokenizer_is_trained_once_and_keyed_by_content(tmp_path):
  sample = tmp_path / "sample"
  sample.mkdir()
  rows = [{"text": t} for t in TEXTS] + [{"messages": [{"role": "user", "content": "Olá"}]}]
  (sample / "mono.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
  cache = tmp_path / "cache"
  path = tokenizers.sample_tokenizer(str(cache), vocab_size=400, sample_dir=str(sample))
  mtime = os.path.getmtime(path)
  assert tokenizers.sample_tokenizer(str(cache), vocab_size=400, sample_dir=str(sample)) == path
  assert os.path.getmtime(path) == mtime
  assert sorted(os.listdir(cache)) == [os.path.basename(path)]  # no temporary files left behind
  tok = tokenizers.SentencePieceTokenizer(path)
  assert all(len(tok.encode(s)) == 1 for s in (*tokenizers.CHAT_SYMBOLS, "\n"))
  (sample / "extra.jsonl").write_text(json.dumps({"text": "more"}) + "\n")
  assert tokenizers.sample_tokenizer(str(cache), vocab_size=400, sample_dir=str(sample)) != path


def test_shipped_sample_tokenizer(tmp_path):
  if not tokenizers.sample_texts():
    pytest.skip("no shipped sample yet")
  tok = tokenizers.SentencePieceTokenizer(tokenizers.sample_tokenizer(str(tmp_path)))
  assert 500 <= tok.vocab_size <= 2048
  text = tokenizers.sample_texts()[0]
  assert tok.decode(tok.encode(text)) == text
