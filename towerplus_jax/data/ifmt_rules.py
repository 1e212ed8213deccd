"""IF-MT style verifiable constraints on a translation output.

A rule is a dict with a "type" and its keys:
  include       {"terms": [...]}                 every term occurs in the output
  exclude       {"terms": [...]}                 no term occurs in the output
  glossary      {"source_term", "target_term"}   source_term in the source => target_term in the output
  max_words     {"value": N}                     at most N words (each Han/kana character counts as one word)
  min_words     {"value": N}                     at least N words
  date_format   {"format": "DD/MM/YYYY"}         every numeric date in the output matches the format (tokens YYYY,
                                                 YY, MM, DD, M, D; the rest literal, e.g. "YYYY年MM月DD日") and is a
                                                 valid date; every date of the source reappears in that format
  number_format {"decimal": "," | "."}           numbers with separators use that decimal mark (1.234,5 vs 1,234.5)
  language      {"lang": "pt-BR"}                output script (and stop-word hint) fits the language
  json          {}                               the output parses as JSON
  no_extra_text {}                               no "Here is the translation:" preamble, no "Note:" lines and no
                                                 more lines than the source (one when no source is given)

Terms match case-insensitively; for terms whose edges are letters/digits of space-delimited scripts the match
must be a whole word ("cat" does not match "category"); Han/kana edges match anywhere.

Heuristic limits: `language` uses the share of letters in the expected script (>= 50%) — zh needs < 5% kana and
ja >= 5% kana, so all-kanji Japanese counts as Chinese; Latin and Cyrillic languages also need at least as many
of their stop words as any other language of the same script, which short or name-only outputs pass vacuously.
Dates in the source are found as numeric triples (ambiguous D/M orders give several candidates, any of which may
survive), "March 5, 2024" / "5 March 2024" (English month names) and "2024年3月5日"; two-digit years mean 20YY.
Numbers like "1,234" are valid under both decimal marks.
"""
from __future__ import annotations

import datetime
import difflib
import json
import re
import unicodedata
from collections.abc import Callable, Sequence

Rule = dict

_CJK = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_SCRIPTS = {
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "kana": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f",
    "hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff",
    "cyrillic": "\u0400-\u04ff",
    "greek": "\u0370-\u03ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f",
    "hebrew": "\u0590-\u05ff",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
}
_LANG_SCRIPT = {
    **dict.fromkeys("en de fr es it pt nl cs pl sv da no nb nn fi hu ro tr is hr sk sl et lv lt ca gl eu id ms "
                    "vi sw af ga cy mt sq".split(), "latin"),
    **dict.fromkeys("ru uk bg mk be kk".split(), "cyrillic"),
    **dict.fromkeys("ar fa ur".split(), "arabic"),
    **dict.fromkeys("hi mr ne".split(), "devanagari"),
    "el": "greek", "he": "hebrew", "th": "thai", "ko": "hangul", "zh": "han", "ja": "han",
}
_STOPWORDS = {k: frozenset(v.split()) for k, v in {
    "en": "the and of to is are was with that this for it not have you",
    "de": "der die das und ist nicht ein eine mit zu den dem ich sie es auf",
    "fr": "le la les et est des une un pas dans pour que qui du au ce",
    "es": "el la los las y es que del una un por con para no se está",
    "it": "il lo la gli le di che è della non per con una sono del",
    "pt": "o a os as não uma um do da dos em que é são com para",
    "nl": "de het een en van is niet dat op met zijn voor ik je",
    "cs": "a je se na to že v ve s z jsou není byl jako",
    "pl": "i w się na nie jest to że z do są jak co ale",
    "sv": "och att det är en ett som på för med inte jag av till",
    "da": "og at det er en et som på for med ikke jeg af til",
    "no": "og at det er en et som på for med ikke jeg av til",
    "fi": "ja on ei se että oli ovat mutta kuin tämä hän minä",
    "hu": "a az és hogy nem egy van is meg ez volt csak",
    "ro": "și în de la este nu cu o un care pe sunt din",
    "tr": "ve bir bu için de da ile ne çok değil olarak ben",
    "is": "og að er í á ekki það sem við var en til",
    "hr": "i je u na da se su ne za od koji što",
    "ru": "и в не на что это с он как по я но был быть",
    "uk": "і в не на що це з він як до я але був та",
    "bg": "и в не на че това с за е да се от са",
}.items()}
_ALIASES = {"nb": "no", "nn": "no"}

_MONTHS = {name: i + 1 for i, names in enumerate(
    ["january jan", "february feb", "march mar", "april apr", "may", "june jun", "july jul", "august aug",
     "september sep sept", "october oct", "november nov", "december dec"]) for name in names.split()}
_MONTH_RE = "|".join(sorted(_MONTHS, key=len, reverse=True))
_NUMERIC_DATE = re.compile(r"(?<![\d.,/-])(\d{1,4})([./-])(\d{1,2})\2(\d{1,4})(?![\d/-]|[.,]\d)")
_CJK_DATE = re.compile(r"(\d{2,4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*日")
_TEXT_DATES = (
    re.compile(rf"\b(?P<mon>{_MONTH_RE})\.?\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b", re.I),
    re.compile(rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<mon>{_MONTH_RE})\.?,?\s+(?P<y>\d{{4}})\b", re.I),
)
_DATE_TOKENS = {"YYYY": ("y", r"\d{4}"), "YY": ("y", r"\d{2}"), "MM": ("m", r"\d{2}"), "DD": ("d", r"\d{2}"),
                "M": ("m", r"\d{1,2}"), "D": ("d", r"\d{1,2}")}

_PREAMBLE = re.compile(r"^(?:(?:sure|certainly|of course|okay|ok|here(?:'s| is| are))\b.*\btranslat"
                       r"|(?:translation|translated text)\s*:|.*\btranslat\w*.*:$)", re.I)
_NOTE_LINE = re.compile(r"^\W*(?:note|notes|explanation|translator's note)\s*:", re.I | re.M)
Date = tuple[int, int, int]


def _spaced_word_char(ch: str) -> bool:
  return (ch.isalnum() or ch == "_") and not re.match(f"[{_CJK}]", ch)


def _contains(text: str, term: str) -> bool:
  """Case-insensitive occurrence, whole-word at edges that are letters/digits of space-delimited scripts."""
  term = unicodedata.normalize("NFC", term)
  before = f"(?<![^\\W{_CJK}])" if _spaced_word_char(term[0]) else ""
  after = f"(?![^\\W{_CJK}])" if _spaced_word_char(term[-1]) else ""
  return re.search(before + re.escape(term) + after, unicodedata.normalize("NFC", text), re.I) is not None


def count_words(text: str) -> int:
  """Whitespace-separated tokens containing a letter or digit; each Han/kana character is one word."""
  return sum(1 for tok in re.findall(f"[{_CJK}]|[^\\s{_CJK}]+", text) if any(c.isalnum() for c in tok))


def _valid(y: int, m: int, d: int) -> Date | None:
  """(y, m, d) when it is a calendar date (two-digit years read as 20YY), else None."""
  y = y + 2000 if y < 100 else y
  try:
    datetime.date(y, m, d)
  except ValueError:
    return None
  return y, m, d


def _source_dates(text: str) -> list[set[Date]]:
  """Each date of the text as the set of (y, m, d) readings it allows."""
  found = []
  for m in _NUMERIC_DATE.finditer(text):
    a, b, c = m.group(1), m.group(3), m.group(4)
    orders = [(a, b, c)] if len(a) == 4 else [(c, b, a), (c, a, b)]  # Y-M-D, or D-M-Y / M-D-Y
    found.append({v for y, mo, d in orders if len(y) in (2, 4) and (v := _valid(int(y), int(mo), int(d)))})
  for m in _CJK_DATE.finditer(text):
    found.append({v} if (v := _valid(*map(int, m.groups()))) else set())
  for pattern in _TEXT_DATES:
    for m in pattern.finditer(text):
      found.append({v} if (v := _valid(int(m["y"]), _MONTHS[m["mon"].lower()], int(m["d"]))) else set())
  return [s for s in found if s]


def _format_regex(fmt: str) -> re.Pattern:
  parts = re.split(r"(YYYY|YY|MM|DD|M|D)", fmt)
  names = [_DATE_TOKENS[p][0] for p in parts if p in _DATE_TOKENS]
  if sorted(names) != ["d", "m", "y"]:
    raise ValueError(f"date_format {fmt!r} needs one year (YYYY/YY), one month (MM/M) and one day (DD/D) token")
  return re.compile("".join(f"(?P<{_DATE_TOKENS[p][0]}>{_DATE_TOKENS[p][1]})" if p in _DATE_TOKENS
                            else re.escape(p) for p in parts))


def _date_spans(text: str, *extra: re.Pattern) -> list[tuple[int, int]]:
  """Spans of date-looking tokens: numeric triples, 年月日 dates and matches of the `extra` patterns."""
  return sorted({m.span() for r in (_NUMERIC_DATE, _CJK_DATE, *extra) for m in r.finditer(text)})


def _check_date_format(rule: Rule, output: str, source: str) -> bool:
  fmt_re = _format_regex(rule["format"])
  dates = set()
  for start, end in _date_spans(output, fmt_re):
    m = fmt_re.fullmatch(output[start:end])
    date = m and _valid(int(m["y"]), int(m["m"]), int(m["d"]))
    if not date:
      return False
    dates.add(date)
  return all(readings & dates for readings in _source_dates(source))


def _check_number_format(rule: Rule, output: str, source: str) -> bool:
  dec = rule["decimal"]
  if dec not in (",", "."):
    raise ValueError(f"number_format decimal must be ',' or '.', got {dec!r} in {rule}")
  group = "." if dec == "," else ","
  ok = re.compile(rf"\d{{1,3}}(?:{re.escape(group)}\d{{3}})*(?:{re.escape(dec)}\d+)?|\d+(?:{re.escape(dec)}\d+)?")
  spans = _date_spans(output)
  for m in re.finditer(r"\d+(?:[.,]\d+)+", output):
    if not any(s <= m.start() < e for s, e in spans) and not ok.fullmatch(m.group()):
      return False
  return True


def _norm_lang(lang: str) -> str:
  code = lang.replace("_", "-").split("-")[0].lower()
  code = _ALIASES.get(code, code)
  if code not in _LANG_SCRIPT:
    raise ValueError(f"language rule: unknown language {lang!r}; known: {sorted(_LANG_SCRIPT)}")
  return code


def _script_share(text: str, *scripts: str) -> float:
  letters = sum(c.isalpha() for c in text)
  chars = "".join(_SCRIPTS[s] for s in scripts)
  return len(re.findall(f"[{chars}]", text)) / letters if letters else 0.0


def _check_language(rule: Rule, output: str, source: str) -> bool:
  code = _norm_lang(rule["lang"])
  script = _LANG_SCRIPT[code]
  if code in ("zh", "ja"):
    kana = _script_share(output, "kana")
    return _script_share(output, "han", "kana") >= 0.5 and (kana >= 0.05) == (code == "ja")
  if _script_share(output, script) < 0.5:
    return False
  if code not in _STOPWORDS:
    return True
  words = re.findall(r"\w+", output.lower())
  hits = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items() if _LANG_SCRIPT[lang] == script}
  return hits[code] >= max(hits.values())


def _check_json(rule: Rule, output: str, source: str) -> bool:
  try:
    json.loads(output)
  except ValueError:
    return False
  return True


def _check_no_extra_text(rule: Rule, output: str, source: str) -> bool:
  text = output.strip()
  lines = text.splitlines() or [""]
  max_lines = max(1, len(source.strip().splitlines()))
  return len(lines) <= max_lines and not _PREAMBLE.match(lines[0].strip()) and not _NOTE_LINE.search(text)


def _check_terms(rule: Rule, output: str, source: str) -> bool:
  present = [_contains(output, t) for t in rule["terms"]]
  return all(present) if rule["type"] == "include" else not any(present)


_CHECKS: dict[str, tuple[tuple[str, ...], Callable[[Rule, str, str], bool]]] = {
    "include": (("terms",), _check_terms),
    "exclude": (("terms",), _check_terms),
    "glossary": (("source_term", "target_term"),
                 lambda r, o, s: not _contains(s, r["source_term"]) or _contains(o, r["target_term"])),
    "max_words": (("value",), lambda r, o, s: count_words(o) <= int(r["value"])),
    "min_words": (("value",), lambda r, o, s: count_words(o) >= int(r["value"])),
    "date_format": (("format",), _check_date_format),
    "number_format": (("decimal",), _check_number_format),
    "language": (("lang",), _check_language),
    "json": ((), _check_json),
    "no_extra_text": ((), _check_no_extra_text),
}


def _is_count(value) -> bool:
  return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())


def validate_rule(rule: Rule) -> None:
  """Raise one ValueError line when `rule` is not a well-formed rule dict (type known, keys present and typed)."""
  if not isinstance(rule, dict) or "type" not in rule:
    raise ValueError(f"a rule must be a dict with a 'type' key, got {rule!r}")
  if rule["type"] not in _CHECKS:
    close = difflib.get_close_matches(str(rule["type"]), _CHECKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown rule type {rule['type']!r}{hint}; known: {sorted(_CHECKS)}")
  required = _CHECKS[rule["type"]][0]
  missing = [k for k in required if k not in rule]
  if missing:
    raise ValueError(f"{rule['type']} rule {rule!r} misses key(s) {missing}")
  if "value" in required and not _is_count(rule["value"]):
    raise ValueError(f"{rule['type']} rule: 'value' must be a whole number, got {rule['value']!r}")
  if "terms" in required and (not isinstance(rule["terms"], (list, tuple))
                              or not all(isinstance(t, str) and t for t in rule["terms"])):
    raise ValueError(f"{rule['type']} rule: 'terms' must be a list of non-empty strings, got {rule['terms']!r}")
  for key in sorted(set(required) - {"value", "terms"}):
    if not isinstance(rule[key], str) or not rule[key]:
      raise ValueError(f"{rule['type']} rule: {key!r} must be a non-empty string, got {rule[key]!r}")


def validate(rules: Sequence[Rule]) -> None:
  """Raise one ValueError line unless `rules` is a list of well-formed rule dicts."""
  if not isinstance(rules, (list, tuple)):
    raise ValueError(f"rules must be a list of rule dicts, got {type(rules).__name__} {rules!r}")
  for rule in rules:
    validate_rule(rule)


def check_rule(rule: Rule, output: str, source: str = "") -> bool:
  """Whether `output` (the translation of `source`) satisfies `rule`."""
  validate_rule(rule)
  return _CHECKS[rule["type"]][1](rule, output, source or "")


def rule_adherence(rules: Sequence[Rule], output: str, source: str = "") -> float:
  """Fraction of `rules` that `output` satisfies (1.0 for no rules)."""
  validate(rules)
  if not rules:
    return 1.0
  return sum(check_rule(r, output, source) for r in rules) / len(rules)


_DESCRIPTIONS: dict[str, Callable[[Rule], str]] = {
    "include": lambda r: "Include these terms: " + ", ".join(f'"{t}"' for t in r["terms"]) + ".",
    "exclude": lambda r: "Do not use these terms: " + ", ".join(f'"{t}"' for t in r["terms"]) + ".",
    "glossary": lambda r: f'Translate "{r["source_term"]}" as "{r["target_term"]}".',
    "max_words": lambda r: f"Use at most {r['value']} words.",
    "min_words": lambda r: f"Use at least {r['value']} words.",
    "date_format": lambda r: f"Write dates as {r['format']}.",
    "number_format": lambda r: f'Use "{r["decimal"]}" as the decimal separator.',
    "language": lambda r: f"Answer in {r['lang']}.",
    "json": lambda r: "Answer with valid JSON only.",
    "no_extra_text": lambda r: "Output only the translation, nothing else.",
}


def describe(rules: Sequence[Rule]) -> str:
  """The rules as instructions for the prompt, one line each (IF-MT style)."""
  validate(rules)
  return "\n".join(_DESCRIPTIONS[r["type"]](r) for r in rules)
