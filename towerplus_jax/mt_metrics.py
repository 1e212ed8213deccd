"""Corpus-level translation metrics: BLEU, chrF, chrF++ (sacrebleu) and optional COMET (unbabel-comet)."""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import sacrebleu

_LANG_NAMES = {"chinese": "zh", "japanese": "ja", "korean": "ko", "zho": "zh", "jpn": "ja", "kor": "ko"}
_MECAB = {"ja": "ja-mecab", "ko": "ko-mecab"}


def lang_code(lang: str) -> str:
  """Primary language subtag, lower-case: "zh_CN" / "zh-Hant" -> "zh"; also "Chinese", "Traditional Chinese",
  "Chinese (Simplified)", "jpn" -> "zh" / "ja"."""
  code = lang.strip().replace("_", "-").split("-")[0].split(" (")[0].lower()
  named = [_LANG_NAMES[w] for w in code.split() if w in _LANG_NAMES]
  return named[-1] if named else code


@functools.cache
def _tokenizer_available(name: str) -> bool:
  try:
    sacrebleu.BLEU(tokenize=name)
  except RuntimeError:  # sacrebleu raises it when MeCab or its dictionary is missing
    return False
  return True


def bleu_tokenizer(lang: str) -> str:
  """sacrebleu BLEU tokenizer for a target language: 'zh', 'ja-mecab' / 'ko-mecab' (else 'char'), '13a'."""
  code = lang_code(lang)
  if code == "zh":
    return "zh"
  if code in _MECAB:
    return _MECAB[code] if _tokenizer_available(_MECAB[code]) else "char"
  return "13a"


def corpus_scores(hyps: Sequence[str], refs: Sequence[str], tgt_lang: str) -> dict[str, float | str]:
  """BLEU, chrF and chrF++ of `hyps` against one reference each, with their sacrebleu signatures."""
  if len(hyps) != len(refs):
    raise ValueError(f"corpus_scores: {len(hyps)} hypotheses but {len(refs)} references")
  metrics = {"bleu": sacrebleu.BLEU(tokenize=bleu_tokenizer(tgt_lang)), "chrf": sacrebleu.CHRF(),
             "chrf++": sacrebleu.CHRF(word_order=2)}
  out: dict[str, float | str] = {}
  for name, metric in metrics.items():
    out[name] = metric.corpus_score(list(hyps), [list(refs)]).score
    out[f"{name}_signature"] = str(metric.get_signature())
  return out


def scores_by_pair(hyps: Sequence[str], refs: Sequence[str], pairs: Sequence[str]) -> dict[str, dict]:
  """`corpus_scores` per language pair; a pair is "src-tgt" split at its first '-' (e.g. "en-pt_BR")."""
  if not len(hyps) == len(refs) == len(pairs):
    raise ValueError(f"scores_by_pair: {len(hyps)} hypotheses, {len(refs)} references, {len(pairs)} pairs")
  groups: dict[str, list[int]] = {}
  for i, pair in enumerate(pairs):
    if "-" not in pair:
      raise ValueError(f"scores_by_pair: language pair {pair!r} (row {i}) is not of the form 'src-tgt'")
    groups.setdefault(pair, []).append(i)
  return {pair: corpus_scores([hyps[i] for i in idx], [refs[i] for i in idx], pair.split("-", 1)[1])
          for pair, idx in sorted(groups.items())}


def comet_scores(srcs: Sequence[str], hyps: Sequence[str], refs: Sequence[str] | None, model_path: str,
                 batch_size: int = 16, gpus: int = 0) -> dict[str, float | list[float]]:
  """COMET system score and segment scores with a local checkpoint (`model.ckpt`, or a model folder holding
  `checkpoints/model.ckpt`); `refs=None` for reference-free models. Needs `pip install unbabel-comet`."""
  try:
    import comet
  except ImportError as e:
    raise ImportError("comet_scores needs the unbabel-comet package: pip install unbabel-comet") from e
  if os.path.isdir(model_path):
    model_path = os.path.join(model_path, "checkpoints", "model.ckpt")
  if not os.path.isfile(model_path):
    raise FileNotFoundError(f"comet_scores: no COMET checkpoint at {model_path}")
  if len(srcs) != len(hyps) or (refs is not None and len(refs) != len(hyps)):
    raise ValueError(f"comet_scores: {len(srcs)} sources, {len(hyps)} hypotheses, {refs and len(refs)} references")
  rows = [{"src": s, "mt": h} for s, h in zip(srcs, hyps)]
  for row, ref in zip(rows, refs or []):
    row["ref"] = ref
  pred = comet.load_from_checkpoint(model_path).predict(rows, batch_size=batch_size, gpus=gpus, progress_bar=False)
  return {"comet": float(pred.system_score), "comet_segments": [float(x) for x in pred.scores]}
