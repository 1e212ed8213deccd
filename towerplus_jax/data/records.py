"""What a record of each batch format must hold, checked where records are parsed (before tokenizing).

`check(kind, record)` raises one ValueError line naming the field and what it must be; the pipeline prefixes it with
the record's file:line. Formats (see data/pipeline.py): `lm` {"text"} or chat or parallel; `sft` chat
({"messages"} or {"prompt","completion"}) or parallel {"source","reference"}; `preference` {"prompt","chosen",
"rejected"}; `rl` {"prompt"} or parallel, + optional "reference", "rules", "answer" and any other columns;
`test` (evaluate.py) {"source", "reference", "src_lang" or "src", "tgt_lang" or "tgt", "rules"?}. Any record's
`src` / `tgt` must be a known language code (data/languages.py); names are free text.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from towerplus_jax.data import ifmt_rules, languages

TEXT_FIELDS = ("text", "source", "reference", "src_lang", "tgt_lang", "src", "tgt")  # plain strings
CODE_FIELDS = ("src", "tgt")  # language codes, checked against data/languages.py
TURN_FIELDS = ("prompt", "completion", "chosen", "rejected")  # a string or a list of messages


def _kind_of(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _check_messages(key: str, value: Any) -> None:
  if not isinstance(value, list) or not value:
    raise ValueError(f"field {key!r} must be a non-empty list of {{'role', 'content'}} messages, got "
                     f"{_kind_of(value)} {value!r:.80}")
  for i, m in enumerate(value):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"field {key!r}: message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}")


def check(kind: str, record: Mapping[str, Any]) -> None:
  """Raise ValueError (one line, naming the field) when `record` cannot be a record of batch format `kind`."""
  for key in TEXT_FIELDS:
    if key in record and not isinstance(record[key], str):
      raise ValueError(f"field {key!r} must be a string, got {_kind_of(record[key])} {record[key]!r:.80}")
  for key in TURN_FIELDS:
    if key in record and not isinstance(record[key], str):
      _check_messages(key, record[key])
  for key in CODE_FIELDS:
    if key in record:
      try:
        languages.canonical(record[key])
      except ValueError as e:
        raise ValueError(f"field {key!r}: {e} (a language name goes in '{key}_lang')") from None
  if "messages" in record:
    _check_messages("messages", record["messages"])
  if "rules" in record and record["rules"] is not None:
    ifmt_rules.validate(record["rules"])
  if kind == "test":
    for key in ("source", "reference"):
      if not isinstance(record.get(key), str):
        raise ValueError(f"field {key!r} is missing: a test record needs 'source' and 'reference' strings (and "
                         "'src_lang'/'tgt_lang' names or 'src'/'tgt' codes)")
    for side in ("src", "tgt"):
      if not any(isinstance(record.get(k), str) and record[k] for k in (side, f"{side}_lang")):
        raise ValueError(f"field '{side}_lang' (a language name) or '{side}' (a code) is missing")
  if kind == "preference":
    for key in ("chosen", "rejected"):
      if not record.get(key):
        raise ValueError(f"field {key!r} is missing or empty: a preference pair needs both responses")
    if record["chosen"] == record["rejected"]:
      raise ValueError("'chosen' and 'rejected' are identical: the pair has no preference to learn")


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict: ...
  def locate(self, index: int) -> str: ...


def read_all(source: Source, kind: str) -> list[dict]:
  """Every record of `source`, each checked as `kind`; an error names the record's file:line."""
  out = []
  for i in range(len(source)):
    record = source[i]
    try:
      check(kind, record)
    except ValueError as e:
      raise ValueError(f"{source.locate(i)}: {e}") from None
    out.append(record)
  return out
