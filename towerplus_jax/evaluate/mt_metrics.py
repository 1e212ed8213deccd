"""Corpus-level translation metrics: BLEU, chrF, chrF++ (sacrebleu); COMET is towerplus_jax.evaluate.comet."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import sacrebleu

from towerplus_jax.data import languages

_MECAB = {"ja": "ja-mecab", "ko": "ko-mecab"}


def lang_code(lang: str) -> str:
  """Primary language code of a code or an English name: "zh_CN" / "zh-Hant" / "Chinese" / "Traditional Chinese" /
  "Chinese (Simplified)" / "zho" -> "zh"; text naming no known language: lower-cased, without a "(...)" part."""
  try:
    return languages.primary(lang)
  except ValueError:
    return languages.code_of_name(lang) or lang.strip().split(" (")[0].lower()


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
