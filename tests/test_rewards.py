"""Reward functions against sacrebleu's sentence scores, hand-computed values and the real COMET package's scores;
loading; weighted combination."""
import json
import math
import os

import ml_collections
import numpy as np
import pytest
import sacrebleu

from towerplus_jax.rl import rewards


def half_reward(prompts, completions, **columns):
  """A user reward loaded by dotted path in the tests."""
  return [0.5 if c else None for c in completions]


def test_chrf_reward():
  hyps = ["O gato está no tapete.", "Olá mundo", "O gato está no tapete."]
  refs = ["O gato está no tapete.", "Olá, mundo!", None]
  out = rewards.chrf_reward(["p"] * 3, hyps, reference=refs)
  assert out[0] == 1.0
  assert out[1] == pytest.approx(sacrebleu.sentence_chrf(hyps[1], [refs[1]]).score / 100)
  assert 0 < out[1] < 1 and out[2] is None
  assert rewards.chrf_reward(["p"], ["x"]) == [None]  # no reference column at all


def test_bleu_reward_uses_target_tokenizer():
  hyps = ["猫坐在一张垫子上。", "Die Katze saß auf einer Matte.", "Die Katze."]
  refs = ["猫坐在垫子上。", "Die Katze saß auf der Matte.", "Die Katze."]
  out = rewards.bleu_reward(["p"] * 3, hyps, reference=refs, tgt=["zh", "de", None])
  zh = sacrebleu.sentence_bleu(hyps[0], [refs[0]], tokenize="zh").score / 100
  assert out[0] == pytest.approx(zh)
  assert zh != pytest.approx(sacrebleu.sentence_bleu(hyps[0], [refs[0]], tokenize="13a").score / 100)
  assert out[1] == pytest.approx(sacrebleu.sentence_bleu(hyps[1], [refs[1]], tokenize="13a").score / 100)
  assert out[2] == pytest.approx(1.0)


def test_rules_reward_reads_rules_and_source():
  rules = [{"type": "glossary", "source_term": "bank", "target_term": "banco"}, {"type": "max_words", "value": 3}]
  out = rewards.rules_reward(["Translate: I went to the bank."] * 3, ["Fui ao banco.", "Fui à margem do rio.", "x"],
                             rules=[rules, rules, None], source=["I went to the bank."] * 3)
  assert out == [1.0, 0.0, None]
  # without a source column the prompt stands in for the source (it contains it)
  assert rewards.rules_reward(["Translate: I went to the bank."], ["Fui à margem."], rules=[rules[:1]]) == [0.0]


@pytest.mark.parametrize("completion,answer,expected", [
    ("3 + 4 = 7, so the answer is 42.", 42, 1.0),
    ("We find x = 42.0", "42", 1.0),
    ("Total: 1,000 apples, then 1,234.", "1234", 1.0),
    ("#### 42.", 42.0, 1.0),
    ("First 42, then the final \\boxed{41}.", 42, 0.0),
    ("So x = \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}} and 9 more", "3/4", 1.0),
    ("\\boxed{\\frac{1}{2}} is wrong; \\boxed{\\frac{2}{3}}", "1/2", 0.0),
    ("The answer is 3/4.", "0.75", 1.0),
    ("The answer is -2.50", "-2.5", 1.0),
    ("Answer: Lisbon.", "lisbon", 1.0),
    ("I am not sure.", "7", 0.0),
    ("The answer is 42, of course.", None, None),
])
def test_exact_answer_reward(completion, answer, expected):
  assert rewards.exact_answer_reward(["p"], [completion], answer=[answer]) == [expected]


@pytest.mark.parametrize("name", sorted(rewards.REGISTRY))
def test_none_or_empty_completion_gets_a_score_not_an_error(name):
  columns = {"reference": ["Olá", "Olá"], "answer": ["1", "1"], "rules": [[{"type": "max_words", "value": 3}]] * 2,
             "source": ["Hello", "Hello"], "tgt": ["pt", "pt"]}
  values = rewards.REGISTRY[name](["p", "p"], [None, []], **columns)
  assert len(values) == 2 and all(isinstance(v, float) for v in values)
  assert values == rewards.REGISTRY[name](["p", "p"], ["", ""], **columns)


def test_format_reward():
  src = ["Hello, world."] * 6
  completions = ["Olá, mundo.", "   ", "Here is the translation: Olá, mundo.", "Olá, mundo " * 10,
                 "Olá, mundo", "```\nOlá, mundo."]
  # ok; empty; preamble (-0.5); 20 words > 3*2+10 and no final stop (-0.25 - 0.25); no final stop;
  # open fence, and two lines for a one-line source (-0.25 - 0.5)
  assert rewards.format_reward(["p"] * 6, completions, source=src) == [1.0, 0.0, 0.5, 0.5, 0.75, 0.25]


def test_length_penalty():
  out = rewards.length_penalty(["p"] * 3, ["abc", "abcdefg", "x"], reference=["abc", "abc", None])
  assert out[0] == 0.0 and out[2] is None
  assert out[1] == pytest.approx(-math.log(8 / 4))


def test_chat_message_completions():
  completions = [[{"role": "assistant", "content": "Olá, mundo."}]]
  assert rewards.chrf_reward([[{"role": "user", "content": "Hi"}]], completions, reference=["Olá, mundo."]) == [1.0]


def test_get_and_load():
  assert rewards.get("chrf") is rewards.chrf_reward
  assert rewards.load("exact_answer") is rewards.exact_answer_reward
  assert rewards.load(f"{__name__}:half_reward") is half_reward
  assert rewards.load(f"{__name__}.half_reward") is half_reward
  assert rewards.load("towerplus_jax.rl.rewards:chrf_reward") is rewards.chrf_reward
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    rewards.get("nope")
  with pytest.raises(ValueError, match="unknown reward 'nope'"):
    rewards.load("nope")
  with pytest.raises(ImportError, match="no_such_module_xyz"):
    rewards.load("no_such_module_xyz:fn")
  with pytest.raises(ImportError, match="missing_fn"):
    rewards.load("towerplus_jax.rl.rewards:missing_fn")
  with pytest.raises(TypeError, match="not a function"):
    rewards.load("towerplus_jax.rl.rewards:REGISTRY")


def test_combine_weights_and_none():
  prompts = ["p"] * 3
  completions = ["Olá, mundo.", "", "Olá"]
  refs = ["Olá, mundo.", "Olá, mundo.", "Olá, mundo."]
  combined = rewards.combine([rewards.chrf_reward, half_reward, half_reward], [2.0, 0.5, -1.0])
  total, per_fn = combined(prompts, completions, reference=refs)
  chrf = np.array([sacrebleu.sentence_chrf(c, [r]).score / 100 for c, r in zip(completions, refs)])
  half = np.array([0.5, np.nan, 0.5])
  np.testing.assert_allclose(per_fn["chrf_reward"], chrf)
  np.testing.assert_array_equal(per_fn["half_reward"], half)
  np.testing.assert_array_equal(per_fn["half_reward_2"], half)
  np.testing.assert_allclose(total, 2.0 * chrf + (0.5 - 1.0) * np.nan_to_num(half))
  with pytest.raises(ValueError, match="2 reward functions and 1 weights"):
    rewards.combine([half_reward, half_reward], [1.0])


def test_column_length_mismatch():
  with pytest.raises(ValueError, match="'reference' has 1 values for 2 completions"):
    rewards.chrf_reward(["p", "q"], ["a", "b"], reference=["a"])


def test_unscorable_completion_is_nan_and_leaves_its_group():
  """Every reward function says None -> total NaN (TRL); the group's mean/std skip it and its advantage is 0."""
  from towerplus_jax.rl import rollout
  combined = rewards.combine([rewards.chrf_reward, rewards.exact_answer_reward])
  total, _ = combined(["p"] * 4, ["a", "b", "c", "d"], reference=["a", None, "c", "x"], answer=[None, None, None, None])
  assert np.isnan(total[1]) and np.isfinite(total[[0, 2, 3]]).all()
  group = np.array([1.0, np.nan, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0])
  for ddof in (0, 1):
    adv, std = rollout.group_advantages(group, 4, scale_std=True, ddof=ddof)
    scored = np.array([1.0, 0.0, 0.5])
    want_std = scored.std(ddof=ddof)
    np.testing.assert_allclose(std, [want_std, 0.0], rtol=1e-6)
    np.testing.assert_allclose(adv[:4], [(1.0 - 0.5) / (want_std + 1e-4), 0.0, -0.5 / (want_std + 1e-4), 0.0],
                               rtol=1e-5)
    np.testing.assert_array_equal(adv[4:], 0.0)
  adv, _ = rollout.group_advantages(np.array([3.0, np.nan, np.nan, np.nan]), 4, ddof=1)
  np.testing.assert_array_equal(adv, 0.0)  # one scorable completion: no spread to learn from


def test_comet_reward_reference_based_and_free_per_row():
  """Rows with a reference get the UnifiedMetric's [mt,src]/[mt,ref]/[mt,src,ref] score, rows without the
  reference-free one; both equal the real unbabel-comet's on the fixture. RegressionMetric leaves ref-less rows."""
  data = os.path.join(os.path.dirname(__file__), "data", "comet")
  fixture = json.load(open(os.path.join(data, "scores.json"), encoding="utf-8"))
  triples = fixture["triples"][:9]
  refs = [t["ref"] if i % 3 else None for i, t in enumerate(triples)]
  completions = [[{"role": "assistant", "content": t["mt"]}] for t in triples]
  cols = {"reference": refs, "source": [t["src"] for t in triples]}
  fn = rewards.load("comet", ml_collections.ConfigDict({"comet_model": os.path.join(data, "unified")}))
  expected = [fixture["unified" if r else "unified_noref"]["scores"][i] for i, r in enumerate(refs)]
  assert fn(["p"] * 9, completions, **cols) == pytest.approx(expected, abs=1e-4)
  regression = rewards.load("comet", ml_collections.ConfigDict({"comet_model": os.path.join(data, "regression")}))
  out = regression(["p"] * 9, completions, **cols)
  assert [o is None for o in out] == [r is None for r in refs]
  assert [o for o in out if o is not None] == pytest.approx(
      [s for s, r in zip(fixture["regression"]["scores"], refs) if r], abs=1e-4)
  combined = rewards.combine([fn])
  combined(["p"] * 9, completions, **cols)
  assert set(combined.seconds) == {"comet"} and combined.seconds["comet"] > 0


def test_comet_reward_needs_a_model_folder():
  with pytest.raises(ValueError, match=r"config.rl.comet_model"):
    rewards.load("comet", ml_collections.ConfigDict({"comet_model": ""}))
