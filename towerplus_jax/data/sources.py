"""Random-access record sources (`len`, `[i] -> dict`, `locate(i)` for error messages): JSONL, ArrayRecord
(JSON-encoded records), TFDS (`tfds.data_source`, array_record format) and seqio tasks, and `open_source`, which
picks one from a spec; `resolve_sources`, which expands a config's comma-separated spec.

Specs: a path or glob (`.jsonl` / `.json` lines, or `*.array_record*`), `tfds:NAME[/CONFIG][:VERSION][?split=S&
data_dir=D]`, `seqio:TASK_OR_MIXTURE[?split=S]`, or a list of those (concatenated in order).
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

GLOB_CHARS = "*?["
SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "sample")  # the shipped sample records (`sample:NAME`)


class RecordSource(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...

  def locate(self, index: int) -> str:
    """Where record `index` comes from, e.g. 'file.jsonl:12'."""


class JsonlSource:
  """One JSON object per non-blank line, read lazily from a memory map (local files) or from memory (remote)."""

  def __init__(self, path: str):
    self.path = path
    self._buf: Any = None
    data = self._data()
    starts, ends = _line_spans(data)
    blank = np.zeros(len(starts), bool)
    short = np.flatnonzero(ends - starts <= 16)  # only short lines can be blank in practice
    blank[short] = [not data[starts[i]:ends[i]].strip() for i in short]
    self._starts, self._ends = starts[~blank], ends[~blank]
    self._lines = np.flatnonzero(~blank) + 1

  def _data(self):
    if self._buf is None:
      if "://" in self.path:
        self._buf = epath.Path(self.path).read_bytes()
      else:
        with open(self.path, "rb") as f:
          self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    return self._buf

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_buf": None}

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> dict:
    return json_object(self._data()[self._starts[index]:self._ends[index]], self.locate(index))

  def locate(self, index: int) -> str:
    return f"{self.path}:{self._lines[index]}"


def json_object(raw: bytes | str, where: str) -> dict:
  """One JSON object record; errors name `where` (file:line or file[record i])."""
  try:
    record = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{where}: invalid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  return record


def _line_spans(data, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
  """[start, end) byte offsets of every line (without the newline), scanning `chunk` bytes at a time."""
  n = len(data)
  newlines = np.concatenate([np.zeros(0, np.int64)] + [
      np.flatnonzero(np.frombuffer(data, np.uint8, count=min(chunk, n - i), offset=i) == ord("\n")) + i
      for i in range(0, n, chunk)])
  starts = np.concatenate([[0], newlines + 1])
  ends = np.concatenate([newlines, [len(data)]])
  if starts[-1] == len(data):  # nothing after the last newline
    starts, ends = starts[:-1], ends[:-1]
  return starts, ends


class ArrayRecordSource:
  """An ArrayRecord file whose records are UTF-8 JSON objects."""

  def __init__(self, path: str):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self.path = path
    self._source = ArrayRecordDataSource([path])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return json_object(self._source[index], self.locate(index))

  def locate(self, index: int) -> str:
    return f"{self.path}[record {index}]"


def to_python(value: Any) -> Any:
  """TFDS / tf.data numpy values as JSON-like python: bytes -> str, arrays -> lists, numpy scalars -> python, and a
  dict of equal-length lists (a TFDS Sequence of dicts, e.g. messages) -> a list of dicts."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [to_python(v) for v in value] if value.ndim else to_python(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, dict):
    out = {k: to_python(v) for k, v in value.items()}
    lengths = {len(v) if isinstance(v, list) else -1 for v in out.values()}
    if len(lengths) == 1 and lengths != {-1}:
      return [dict(zip(out, row)) for row in zip(*out.values())]
    return out
  return value


class TfdsSource:
  """A TFDS dataset prepared in array_record format, read with `tfds.data_source` (no TensorFlow needed)."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ImportError(f"tfds:{name} needs tensorflow-datasets: pip install 'towerplus_jax[tfds]'") from e
    self.name, self.split = name, split
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return to_python(self._source[index])

  def locate(self, index: int) -> str:
    return f"tfds:{self.name} split {self.split} record {index}"


def seqio_record(example: dict) -> dict:
  """A seqio example as a record: `*_pretokenized` texts replace their token ids; `inputs`+`targets` texts also
  become `prompt`+`completion`, a lone `targets` text becomes `text`."""
  record = {k: v for k, v in example.items() if not k.endswith("_pretokenized")}
  record.update({k[:-len("_pretokenized")]: v for k, v in example.items() if k.endswith("_pretokenized")})
  inputs, targets = record.get("inputs"), record.get("targets")
  if isinstance(targets, str) and isinstance(inputs, str):
    record.setdefault("prompt", inputs)
    record.setdefault("completion", targets)
  elif isinstance(targets, str):
    record.setdefault("text", targets)
  return record


class SeqioSource:
  """All examples of a seqio task or mixture split, read once into memory (seqio datasets are not random-access)."""

  def __init__(self, name: str, split: str = "train"):
    try:
      import seqio
    except ImportError as e:
      raise ImportError(f"seqio:{name} needs seqio: pip install 'towerplus_jax[seqio]'") from e
    self.name, self.split = name, split
    dataset = seqio.get_mixture_or_task(name).get_dataset(sequence_length=None, split=split, shuffle=False,
                                                          num_epochs=1, use_cached=False)
    self._records = [seqio_record(to_python(ex)) for ex in dataset.as_numpy_iterator()]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return dict(self._records[index])

  def locate(self, index: int) -> str:
    return f"seqio:{self.name} split {self.split} example {index}"


class ConcatSource:
  """Several sources one after the other."""

  def __init__(self, sources: Sequence[RecordSource]):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _find(self, index: int) -> tuple[RecordSource, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    k = int(np.searchsorted(self._ends, index, side="right"))
    return self.sources[k], index - (int(self._ends[k - 1]) if k else 0)

  def __getitem__(self, index: int) -> dict:
    source, i = self._find(index)
    return source[i]

  def locate(self, index: int) -> str:
    source, i = self._find(index)
    return source.locate(i)


def _expand(pattern: str) -> list[str]:
  if not any(c in pattern for c in GLOB_CHARS):
    if not epath.Path(pattern).exists():
      raise FileNotFoundError(f"data file {pattern} does not exist")
    return [pattern]
  if "://" in pattern:
    parts = pattern.split("/")
    k = next(i for i, p in enumerate(parts) if any(c in p for c in GLOB_CHARS))
    paths = sorted(str(p) for p in epath.Path("/".join(parts[:k])).glob("/".join(parts[k:])))
  else:
    paths = sorted(glob.glob(pattern))
  if not paths:
    raise FileNotFoundError(f"no data file matches {pattern}")
  return paths


def _open_file(path: str) -> RecordSource:
  name = os.path.basename(path)
  if epath.Path(path).is_dir():
    raise ValueError(f"{path} is a directory, not a data file; give its files (e.g. '{path}/*.jsonl')")
  if name.endswith((".jsonl", ".json")):
    source: RecordSource = JsonlSource(path)
  elif ".array_record" in name:
    source = ArrayRecordSource(path)
  else:
    raise ValueError(f"{path}: unknown data format; use .jsonl, .array_record, tfds:NAME or seqio:TASK")
  if not len(source):
    raise ValueError(f"{path}: no records (the file is empty or holds only blank lines)")
  return source


def _name_and_options(spec: str) -> tuple[str, dict[str, str]]:
  name, _, query = spec.partition("?")
  options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
  if not name:
    raise ValueError(f"data spec {spec!r} names no dataset")
  return name, options


def open_source(spec: str | Sequence[str]) -> RecordSource:
  """The records of `spec` (see the module docstring); a list gives their concatenation."""
  if not isinstance(spec, str):
    parts = [open_source(s) for s in spec]
    if not parts:
      raise ValueError("no data sources given")
    return parts[0] if len(parts) == 1 else ConcatSource(parts)
  if spec.startswith("tfds:"):
    name, options = _name_and_options(spec[len("tfds:"):])
    return TfdsSource(name, split=options.get("split", "train"), data_dir=options.get("data_dir"))
  if spec.startswith("seqio:"):
    name, options = _name_and_options(spec[len("seqio:"):])
    return SeqioSource(name, split=options.get("split", "train"))
  files = [_open_file(p) for p in _expand(spec)]
  return files[0] if len(files) == 1 else ConcatSource(files)


def resolve_sources(spec: str) -> list[str]:
  """Comma-separated paths, globs, `sample:NAME` (a file shipped in towerplus_jax/data/sample), tfds:/seqio: specs."""
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if part.startswith("sample:"):
      out.append(os.path.join(SAMPLE_DIR, part[len("sample:"):] + ".jsonl"))
    elif part.startswith(("tfds:", "seqio:")) or not any(c in part for c in GLOB_CHARS):
      out.append(part)
    else:
      out.extend(sorted(glob.glob(part)) or [part])
  return out
