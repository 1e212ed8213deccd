"""A SentencePiece BPE model (Gemma-style: no normalisation, no dummy prefix, byte fallback) as a Hugging Face
`tokenizer.json`: the same ids for every text, its control and user-defined pieces (chat markers, '\\n') as added
tokens, so that `transformers` loads an export through the generic fast tokenizer whatever the model family."""
from __future__ import annotations

from collections.abc import Iterable

import tokenizers as hf_tokenizers
from etils import epath
from sentencepiece import sentencepiece_model_pb2

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # SentencePiece piece types
BPE = 2  # SentencePiece model type


def _merges(proto: sentencepiece_model_pb2.ModelProto) -> list[tuple[str, str]]:
  """Every (left, right) pair of normal pieces whose concatenation is a normal piece, ranked as SentencePiece's BPE
  applies them: the merged piece's score first (higher first), then its id, then the left piece's id."""
  ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
  ranked = []
  for piece, i in ids.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in ids and right in ids:
        ranked.append((-proto.pieces[i].score, i, ids[left], left, right))
  return [(left, right) for *_, left, right in sorted(ranked)]


def sentencepiece_to_json(model_path: str, special: Iterable[str] = ()) -> hf_tokenizers.Tokenizer:
  """The `tokenizers` equivalent of the SentencePiece model at `model_path`; control pieces and those in `special`
  are special tokens (left out when decoding with skip_special_tokens), other user-defined pieces plain ones."""
  proto = sentencepiece_model_pb2.ModelProto.FromString(epath.Path(model_path).read_bytes())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  if spec.model_type != BPE or norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.precompiled_charsmap:
    raise ValueError(f"{model_path}: only a BPE SentencePiece model without normalisation or dummy prefix (as Gemma's "
                     "and the sample tokenizer) converts to tokenizer.json; export with the model's own tokenizer.json")
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE(
      vocab, _merges(proto), unk_token=proto.pieces[spec.unk_id].piece, fuse_unk=True,
      byte_fallback=spec.byte_fallback))
  tok.normalizer = hf_tokenizers.normalizers.Replace(" ", "▁")
  tok.decoder = hf_tokenizers.decoders.Sequence([hf_tokenizers.decoders.Replace("▁", " "),
                                                 hf_tokenizers.decoders.ByteFallback(), hf_tokenizers.decoders.Fuse()])
  special = set(special)
  tok.add_tokens([hf_tokenizers.AddedToken(p.piece, special=p.type == CONTROL or p.piece in special, normalized=False)
                  for p in proto.pieces if p.type in (CONTROL, USER_DEFINED)])
  return tok
