"""Preference pairs derived from parallel records, for the embedded default's WPO stage.

Not a human preference set: `chosen` is the reference translation and `rejected` one of three errors translation
models make — the source left untranslated, a fluent translation of another sentence (hallucinated content), or a
truncated translation — chosen by record index. Regenerate the shipped file with
`python -m towerplus_jax.data.derive` (tests check it is up to date).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator

from towerplus_jax.data import chat
from towerplus_jax.data.sources import SAMPLE_DIR


def preference_pairs(records: Iterable[dict]) -> Iterator[dict]:
  records = list(records)
  for i, r in enumerate(records):
    if i % 3 == 0:
      rejected = r["source"]
    elif i % 3 == 1:
      same_lang = [o for o in records if o["tgt"] == r["tgt"] and o["reference"] != r["reference"]]
      rejected = same_lang[i % len(same_lang)]["reference"]
    else:
      rejected = _truncated(r["reference"])
    yield {"prompt": chat.translation_prompt(r["src_lang"], r["tgt_lang"], r["source"]), "chosen": r["reference"],
           "rejected": rejected}


def _truncated(text: str) -> str:
  """The first half, in words (in characters for text without spaces, e.g. Chinese)."""
  words = text.split()
  return " ".join(words[:len(words) // 2]) if len(words) > 1 else text[:len(text) // 2]


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def render(records: Iterable[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> None:
  """`python -m towerplus_jax.data.derive [--parallel=FILE] [--out=FILE]` (defaults: the shipped sample files)."""
  parser = argparse.ArgumentParser(prog="python -m towerplus_jax.data.derive", description=__doc__.split("\n\n")[0])
  parser.add_argument("--parallel", default=os.path.join(SAMPLE_DIR, "parallel.jsonl"),
                      help="parallel records {source, reference, src_lang, tgt_lang, tgt} to derive pairs from")
  parser.add_argument("--out", default=os.path.join(SAMPLE_DIR, "preferences.jsonl"), help="preference JSONL written")
  args = parser.parse_args(argv)
  pairs = preference_pairs(read_jsonl(args.parallel))
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(render(pairs))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
