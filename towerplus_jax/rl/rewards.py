"""Verifiable reward functions with the TRL signature `fn(prompts, completions, **columns) -> list[float | None]`.

`columns` are dataset columns as lists aligned with `completions` (e.g. reference, source, rules, answer, tgt);
None means "not applicable to this sample". Prompts and completions are strings or chat messages (the content
of the last message is used). Where a function needs the source text it reads column `source`, else the prompt
(which contains the source in the translation prompt format).

Registered names (`get`, `load`): chrf, bleu, rules, exact_answer, format, length_penalty; `load(name, rl_config)`
also builds the model-based `comet` (the COMET folder in rl.comet_model) and takes a dotted path
"package.module:function" or "package.module.function"; `combine` makes the weighted sum and times each function.
"""
from __future__ import annotations

import functools
import importlib
import math
import re
import time
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import sacrebleu

from towerplus_jax.data import ifmt_rules
from towerplus_jax.evaluate import comet as comet_lib
from towerplus_jax.evaluate import mt_metrics

RewardFn = Callable[..., list[float | None]]
CombinedFn = Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]]

_BOXED = "\\boxed{"
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_MARKED = re.compile(r"(?:####|\banswer\s*(?:is\b|:))[\s:]*([^\n]+)", re.I)
_NUMBER = re.compile(r"[-+]?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|\.\d+)(?:/\d+)?")
_TERMINALS = ".!?。！？…؟।"
_CLOSERS = "\"'”’»)]」』"
_MAX_WORDS_FACTOR, _MAX_WORDS_SLACK = 3, 10


def _text(x) -> str:
  """A string, or the content of the last message of a chat (list of {"role", "content"} dicts); None or an empty
  chat is the empty string (an empty completion still gets a score)."""
  if x is None:
    return ""
  if isinstance(x, str):
    return x
  if isinstance(x, dict):
    return str(x.get("content") or "")
  if isinstance(x, Sequence):
    return _text(x[-1]) if x else ""
  raise TypeError(f"expected a string or a list of chat messages, got {type(x).__name__}: {x!r}")


def _column(columns: dict, name: str, n: int) -> list:
  """Column `name` as a list of n values (all None when the dataset has no such column)."""
  values = columns.get(name)
  if values is None:
    return [None] * n
  if len(values) != n:
    raise ValueError(f"reward column {name!r} has {len(values)} values for {n} completions")
  return list(values)


def _sources(prompts: Sequence, columns: dict) -> list[str]:
  src = _column(columns, "source", len(prompts))
  return [_text(s if s is not None else p) for s, p in zip(src, prompts)]


@functools.cache
def _bleu(tokenize: str) -> sacrebleu.BLEU:
  return sacrebleu.BLEU(tokenize=tokenize, effective_order=True)


@functools.cache
def _chrf() -> sacrebleu.CHRF:
  return sacrebleu.CHRF()


def chrf_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
  """Sentence chrF / 100 against column `reference` (sacrebleu defaults, as `sacrebleu.sentence_chrf`)."""
  refs = _column(columns, "reference", len(completions))
  return [None if r is None else _chrf().sentence_score(_text(c), [r]).score / 100
          for c, r in zip(completions, refs)]


def bleu_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
  """Sentence BLEU / 100 (exp smoothing, effective order) against `reference`; tokenizer from column `tgt`."""
  refs = _column(columns, "reference", len(completions))
  tgts = _column(columns, "tgt", len(completions))
  return [None if r is None else
          _bleu(mt_metrics.bleu_tokenizer(t) if t else "13a").sentence_score(_text(c), [r]).score / 100
          for c, r, t in zip(completions, refs, tgts)]


def rules_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
  """Fraction of the rules in column `rules` that the completion satisfies; None without rules."""
  rule_lists = _column(columns, "rules", len(completions))
  return [ifmt_rules.rule_adherence(rs, _text(c), s) if rs else None
          for c, rs, s in zip(completions, rule_lists, _sources(prompts, columns))]


def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...}, nested braces included (\\boxed{\\frac{1}{2}} -> \\frac{1}{2})."""
  start = text.rfind(_BOXED)
  while start >= 0:
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
      depth += {"{": 1, "}": -1}.get(text[j], 0)
      if depth == 0:
        return text[i:j]
    start = text.rfind(_BOXED, 0, start)  # unclosed: try an earlier one
  return None


def final_answer(text: str) -> str | None:
  """The last \\boxed{...} (LaTeX fractions read as a/b), else what follows the last "####" / "answer is" /
  "Answer:", else the last number. From a boxed or marked answer the first number is taken when it has one."""
  marked = _MARKED.findall(text)
  for found in (_last_boxed(text), marked[-1] if marked else None):
    if found is not None:
      found = _FRAC.sub(r"\1/\2", found)
      number = _NUMBER.search(found)
      return number.group() if number else found
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _as_number(s: str) -> Fraction | None:
  try:
    return Fraction(s.strip().rstrip(".").replace(",", "").lstrip("+"))
  except (ValueError, ZeroDivisionError):
    return None


def _norm_text(s: str) -> str:
  return s.strip().rstrip(".").strip().casefold()


def answers_match(predicted: str, expected) -> bool:
  """Numbers compare exactly as rationals ("42" == "42.0" == "42." == 42, "1,000" == 1000, "3/4" == "0.75"; commas
  are thousands separators); other answers compare case-insensitively without surrounding space and final period."""
  a, b = _as_number(predicted), _as_number(str(expected))
  if a is not None and b is not None:
    return a == b
  return _norm_text(predicted) == _norm_text(str(expected))


def exact_answer_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
  """1.0 when `final_answer(completion)` matches column `answer`, else 0.0; None without an answer."""
  answers = _column(columns, "answer", len(completions))
  out: list[float | None] = []
  for c, a in zip(completions, answers):
    predicted = final_answer(_text(c))
    out.append(None if a is None else float(predicted is not None and answers_match(predicted, a)))
  return out


def _format_score(completion: str, source: str) -> float:
  text = completion.strip()
  if not text:
    return 0.0
  extra = not ifmt_rules.check_rule({"type": "no_extra_text"}, text, source)
  long = ifmt_rules.count_words(text) > _MAX_WORDS_FACTOR * ifmt_rules.count_words(source) + _MAX_WORDS_SLACK
  open_fence = text.count("```") % 2 == 1
  cut = source.strip().endswith(tuple(_TERMINALS)) and not text.rstrip(_CLOSERS).endswith(tuple(_TERMINALS))
  return max(0.0, 1.0 - 0.5 * extra - 0.25 * long - 0.25 * (open_fence or cut))


def format_reward(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
  """0.0 for an empty completion; else 1.0 minus 0.5 for extra text (the `no_extra_text` rule fails: preamble,
  "Note:" lines, more lines than the source), minus 0.25 when over-long (more than 3 × source words + 10),
  minus 0.25 when unterminated (an unclosed ``` fence, or the source ends with . ! ? 。 ！ ？ … ؟ । and the
  completion, before closing quotes/brackets, does not)."""
  return [_format_score(_text(c), s) for c, s in zip(completions, _sources(prompts, columns))]


def length_penalty(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
  """-|log((len(completion) + 1) / (len(reference) + 1))| in characters; 0 at equal length, None without one."""
  refs = _column(columns, "reference", len(completions))
  return [None if r is None else -abs(math.log((len(_text(c).strip()) + 1) / (len(r.strip()) + 1)))
          for c, r in zip(completions, refs)]


def comet_reward(model_dir: str, batch_size: int = 16) -> RewardFn:
  """COMET of each completion (towerplus_jax.evaluate.comet, the model loaded once per process): against column
  `reference` where the row has one, reference-free (source + completion) where not; None for rows without a
  reference when the model needs references (RegressionMetric, e.g. wmt22-comet-da)."""
  scorer = comet_lib.cached(model_dir, batch_size)

  def comet(prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
    refs = _column(columns, "reference", len(completions))
    srcs, hyps = _sources(prompts, columns), [_text(c) for c in completions]
    out: list[float | None] = [None] * len(completions)
    for with_ref in (True, False):
      rows = [i for i, r in enumerate(refs) if (r is not None) == with_ref]
      if not rows or (not with_ref and scorer.requires_references):
        continue
      scores = scorer.segment_scores([srcs[i] for i in rows], [hyps[i] for i in rows],
                                     [_text(refs[i]) for i in rows] if with_ref else None)
      for i, s in zip(rows, scores):
        out[i] = float(s)
    return out

  return comet


# Rewards built from the RL config section (a model to load once): name -> factory(rl config).
FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "comet": lambda rl: comet_reward(_required(rl, "comet_model", "a COMET folder, e.g. Unbabel/wmt22-comet-da"),
                                     int(rl.get("comet_batch_size", 16))),
}


def _required(rl, key: str, what: str):
  value = rl.get(key) if rl is not None else None
  if not value:
    raise ValueError(f"this reward needs config.rl.{key} ({what}): add --config.rl.{key}=DIR")
  return value


REGISTRY: dict[str, RewardFn] = {
    "chrf": chrf_reward,
    "bleu": bleu_reward,
    "rules": rules_reward,
    "exact_answer": exact_answer_reward,
    "format": format_reward,
    "length_penalty": length_penalty,
}


def get(name: str) -> RewardFn:
  """A registered reward function by name."""
  if name not in REGISTRY:
    raise ValueError(f"unknown reward {name!r}; registered: {sorted(REGISTRY) + sorted(FACTORIES)} (or give "
                     "'package.module:function')")
  return REGISTRY[name]


def load(spec: str, rl=None) -> RewardFn:
  """A registered name, a model-based one built from `rl` (the config's rl section, e.g. "comet"), or a user
  function as "package.module:function" / "package.module.function"."""
  if spec in REGISTRY:
    return REGISTRY[spec]
  if spec in FACTORIES:
    return FACTORIES[spec](rl)
  if ":" not in spec and "." not in spec:
    return get(spec)
  module_name, attr = spec.split(":", 1) if ":" in spec else spec.rsplit(".", 1)
  try:
    fn = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
  except (ImportError, AttributeError) as e:
    raise ImportError(f"cannot load reward function {spec!r}: {e}") from e
  if not callable(fn):
    raise TypeError(f"reward {spec!r} is a {type(fn).__name__}, not a function")
  return fn


def _names(fns: Sequence[RewardFn]) -> list[str]:
  names: list[str] = []
  for fn in fns:
    base = getattr(fn, "__name__", type(fn).__name__)
    name, k = base, 2
    while name in names:
      name, k = f"{base}_{k}", k + 1
    names.append(name)
  return names


def combine(fns: Sequence[RewardFn], weights: Sequence[float] | None = None) -> CombinedFn:
  """`combined(prompts, completions, **cols) -> (total[N], {fn name: values[N]})`: total = Σ_k w_k r_k with None
  counted as 0, and NaN where every function returned None (unscorable: it leaves its group's statistics, as in
  TRL); the per-function values keep None as NaN (so their means skip non-applicable samples). After each call
  `combined.seconds` holds {fn name: wall seconds} of that call."""
  weights = [1.0] * len(fns) if weights is None else list(weights)
  if len(weights) != len(fns) or not fns:
    raise ValueError(f"combine: {len(fns)} reward functions and {len(weights)} weights (need as many, at least one)")
  names = _names(fns)

  def combined(prompts: Sequence, completions: Sequence, **columns) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    total_N = np.zeros(len(completions), np.float64)
    per_fn: dict[str, np.ndarray] = {}
    for name, fn, w in zip(names, fns, weights):
      start = time.perf_counter()
      values = fn(prompts, completions, **columns)
      combined.seconds[name] = time.perf_counter() - start
      if len(values) != len(completions):
        raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
      r_N = np.array([np.nan if v is None else float(v) for v in values], np.float64)
      per_fn[name] = r_N
      total_N += w * np.nan_to_num(r_N, nan=0.0)
    unscorable_N = np.all(np.isnan(np.stack(list(per_fn.values()))), axis=0)
    return np.where(unscorable_N, np.nan, total_N), per_fn

  combined.seconds = {}
  return combined
