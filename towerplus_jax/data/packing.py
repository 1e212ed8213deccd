"""Tokenized examples -> fixed-length rows with `segment_ids` (1..n per row, 0 = padding) and `positions`
(restarting at 0 per segment). Packing is grain's best-fit packer; examples longer than a row are first split
into row-sized chunks (each chunk its own segment). Rows also carry int32 `example_start`: 1 on the first token of
each example, 2 when that example was longer than the row (split), 0 elsewhere (pipeline.py counts them)."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

SEQUENCE_KEYS = ("inputs", "targets", "loss_mask")
START = "example_start"


def shifted_example(ids: Sequence[int], mask: Sequence[int]) -> dict[str, np.ndarray]:
  """Next-token example of a token sequence: inputs ids[:-1], targets ids[1:], loss_mask mask[1:] (float32)."""
  ids_L = np.asarray(ids, np.int32)
  return {"inputs": ids_L[:-1], "targets": ids_L[1:], "loss_mask": np.asarray(mask, np.float32)[1:]}


class SplitLong(grain.experimental.FlatMapTransform):
  """An example as consecutive chunks of at most `length` tokens (none for an empty example), marked with
  `example_start` (module docstring)."""

  def __init__(self, length: int):
    self.length = length
    self.max_fan_out = 1 << 20

  def flat_map(self, example: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(example["inputs"])
    start_L = np.zeros(n, np.int32)
    start_L[:1] = 2 if n > self.length else 1
    example = {**example, START: start_L}
    return [{k: example[k][i:i + self.length] for k in (*SEQUENCE_KEYS, START)} for i in range(0, n, self.length)]


def split_long(dataset: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  return grain.experimental.FlatMapIterDataset(dataset, SplitLong(seq_len))


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {k: row[k] for k in (*SEQUENCE_KEYS, START)}
  out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
  out["positions"] = row["inputs_positions"].astype(np.int32)
  return out


def pack(dataset: grain.IterDataset, seq_len: int, num_bins: int, seed: int,
         shuffle_bins: bool = True) -> grain.IterDataset:
  """Rows of `seq_len` tokens packed best-fit from `num_bins` open bins (emitted when an example fits none)."""
  packed = grain.experimental.BestFitPackIterDataset(
      split_long(dataset, seq_len), length_struct={k: seq_len for k in (*SEQUENCE_KEYS, START)},
      num_packing_bins=num_bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(_rename)


def pad_row(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example (at most `seq_len` tokens) right-padded to a row: segment id 1, positions 0..n-1."""
  n = len(example["inputs"])
  if n > seq_len:
    raise ValueError(f"example of {n} tokens does not fit a row of {seq_len}")
  row = {k: np.pad(np.asarray(v), (0, seq_len - n)) for k, v in example.items()}
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return row


def pad(dataset: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """One row per example (long examples split into several rows), right-padded."""
  return split_long(dataset, seq_len).map(functools.partial(pad_row, seq_len=seq_len))
