"""Language codes of translation records (`src` / `tgt`) and the English names the Tower+ prompt uses.

Known: the Tower+ languages with the variants Tower uses (pt-PT / pt-BR, zh-CN / zh-TW, es-LATAM, nb / nn) and the
other common ISO 639-1 codes. Codes are case-insensitive and '_' is '-' ("pt_br" = "pt-BR"); a region (2 letters
or 3 digits) or script (4 letters) of a known language ("de-AT", "es-419", "zh-Hant") is that language. Anything
else is refused, naming the closest codes. Names (`src_lang` / `tgt_lang`) are free text ("Portuguese (Portugal)")
and are not checked.
"""
from __future__ import annotations

import difflib
import re

NAMES = {
    # Tower+ (Rei et al. 2025)
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "es-LATAM": "Spanish (Latin America)",
    "it": "Italian", "pt": "Portuguese", "pt-PT": "Portuguese (Portugal)", "pt-BR": "Portuguese (Brazil)",
    "nl": "Dutch", "ru": "Russian", "uk": "Ukrainian", "cs": "Czech", "pl": "Polish", "ko": "Korean",
    "ja": "Japanese", "zh": "Chinese", "zh-CN": "Chinese (Simplified)", "zh-TW": "Chinese (Traditional)",
    "hi": "Hindi", "is": "Icelandic", "sv": "Swedish", "da": "Danish", "no": "Norwegian",
    "nb": "Norwegian (Bokmål)", "nn": "Norwegian (Nynorsk)", "fi": "Finnish", "hu": "Hungarian", "ro": "Romanian",
    # other ISO 639-1
    "af": "Afrikaans", "ar": "Arabic", "be": "Belarusian", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan",
    "cy": "Welsh", "el": "Greek", "et": "Estonian", "eu": "Basque", "fa": "Persian", "ga": "Irish",
    "gl": "Galician", "gu": "Gujarati", "he": "Hebrew", "hr": "Croatian", "hy": "Armenian", "id": "Indonesian",
    "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "lt": "Lithuanian", "lv": "Latvian",
    "mk": "Macedonian", "ml": "Malayalam", "mr": "Marathi", "ms": "Malay", "mt": "Maltese", "my": "Burmese",
    "ne": "Nepali", "pa": "Punjabi", "sk": "Slovak", "sl": "Slovenian", "sq": "Albanian", "sr": "Serbian",
    "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "zu": "Zulu",
}
ALIASES = {"zho": "zh", "jpn": "ja", "kor": "ko"}  # ISO 639-2 codes some test sets use
_BY_KEY = {code.lower(): code for code in NAMES}
_BY_NAME = {name.lower(): code for code, name in NAMES.items() if "-" not in code}


def _key(code: str) -> str:
  return code.strip().replace("_", "-").lower()


def canonical(code: str) -> str:
  """The registry's spelling of `code` ("pt_br" -> "pt-BR", "de-AT" -> "de", "jpn" -> "ja"); ValueError naming the
  closest known codes when its language is unknown."""
  key = _key(code)
  if key in _BY_KEY:
    return _BY_KEY[key]
  primary, *subtags = key.split("-")
  primary = ALIASES.get(primary, primary)
  if primary in _BY_KEY and all(re.fullmatch(r"[a-z]{2}|[a-z]{4}|\d{3}", t) for t in subtags):  # region, script
    return primary
  close = difflib.get_close_matches(key, list(_BY_KEY), n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(repr(_BY_KEY[c]) for c in close)}? " if close else ""
  raise ValueError(f"unknown language code {code!r}: {hint}Use an ISO 639-1 code such as 'pt' or 'pt-BR' (see "
                   "towerplus_jax/data/languages.py)")


def name(code: str) -> str:
  """English name of a language code, as the Tower+ prompt writes it ("pt-BR" -> "Portuguese (Brazil)")."""
  return NAMES[canonical(code)]


def primary(code: str) -> str:
  """The language of a code without region or script ("pt-BR" -> "pt")."""
  return canonical(code).split("-")[0]


def code_of_name(language: str) -> str | None:
  """The language code of an English name: "Portuguese (Portugal)" -> "pt", "Traditional Chinese" -> "zh"; None
  when no word of it names a known language."""
  text = language.strip().lower()
  if text in _BY_NAME:
    return _BY_NAME[text]
  words = [w for w in text.replace("(", " ").replace(")", " ").split() if w in _BY_NAME]
  return _BY_NAME[words[0]] if words else None
