"""Tokenized examples -> fixed-length rows with `segment_ids` (1..n per row, 0 = padding) and `positions`
(restarting at 0 per segment). Packing is grain's best-fit packer; examples longer than a row are first split
into row-sized chunks (each chunk its own segment). Rows also carry int32 `example_start`: 1 on the first token of
each example, 2 when that example was longer than the row (split), 0 elsewhere (pipeline.py counts them).
A step's preference pairs (`pack_pairs`) and a rollout's prompt ⧺ completion sequences (`pack_sequences`) are
packed whole instead: first-fit, longest first, into one of a few row counts (`row_buckets`)."""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

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


def fit_pair(chosen: dict[str, np.ndarray], rejected: dict[str, np.ndarray], seq_len: int
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], bool]:
  """Both sides of a preference pair cut (at their ends) to share a row of `seq_len` tokens: the longer side first,
  neither below half the row. Returns the sides and whether any was cut."""
  n_c, n_r = len(chosen["inputs"]), len(rejected["inputs"])
  if n_c + n_r <= seq_len:
    return chosen, rejected, False
  half = seq_len // 2
  if n_c > half and n_r > half:
    n_c, n_r = seq_len - half, half
  elif n_c > n_r:
    n_c = seq_len - n_r
  else:
    n_r = seq_len - n_c
  cut = lambda side, n: {k: v[:n] for k, v in side.items()}
  return cut(chosen, n_c), cut(rejected, n_r), True


def row_buckets(max_rows: int, multiple: int) -> list[int]:
  """The row counts a packed step may have: multiples of `multiple`, each at most 10% above the one before once past
  ten multiples (so rounding a step's rows up to a bucket wastes under 10% of them there), up to >= `max_rows`."""
  buckets = [multiple]
  while buckets[-1] < max_rows:
    b = buckets[-1]
    buckets.append(max(b + multiple, b * 11 // 10 // multiple * multiple))
  return buckets


def _first_fit(lengths_E: np.ndarray, seq_len: int, slots: int) -> list[list[int]]:
  """Examples (longest first) into the first row with room for them and a free slot: the rows' example indices."""
  rows: list[list[int]] = []
  used: list[int] = []
  for e in sorted(range(len(lengths_E)), key=lambda i: -lengths_E[i]):
    r = next((r for r in range(len(rows)) if used[r] + lengths_E[e] <= seq_len and len(rows[r]) < slots), len(rows))
    if r == len(rows):
      rows.append([])
      used.append(0)
    rows[r].append(e)
    used[r] += int(lengths_E[e])
  return rows


def _place(lengths_E: np.ndarray, seq_len: int, slots: int, buckets: Sequence[int], what: str
           ) -> tuple[list[list[int]], int]:
  """`_first_fit`'s rows of the examples and the smallest bucket (row count) that holds them."""
  rows = _first_fit(lengths_E, seq_len, slots)
  num_rows = next((b for b in buckets if b >= len(rows)), None)
  if num_rows is None:
    raise ValueError(f"{len(lengths_E)} {what} need {len(rows)} rows; the largest bucket is {buckets[-1]}")
  return rows, num_rows


def pack_pairs(examples: Sequence[dict], seq_len: int, slots: int, buckets: Sequence[int],
               pair_keys: Sequence[str]) -> dict[str, np.ndarray]:
  """Preference examples ({side}_{inputs,targets,loss_mask}, each pair at most `seq_len` tokens, and scalar
  `pair_keys`) -> one packed batch (formats.PREFERENCE.packed) of the smallest bucket's rows that holds them: pair p
  of a row is segments 2p+1 (chosen), 2p+2 (rejected); per-pair fields [rows, slots] (record_index -1 in unused
  slots, NaN reference log-probs), `num_examples` / `num_truncated` per row."""
  sides = [[{k: e[f"{s}_{k}"] for k in SEQUENCE_KEYS} for s in ("chosen", "rejected")] for e in examples]
  lengths_E = np.asarray([sum(len(side["inputs"]) for side in pair) for pair in sides])
  rows, num_rows = _place(lengths_E, seq_len, slots, buckets, "pairs")
  out = {k: np.zeros((num_rows, seq_len), np.float32 if k == "loss_mask" else np.int32)
         for k in (*SEQUENCE_KEYS, "segment_ids", "positions")}
  out.update({k: np.full((num_rows, slots), np.nan if k.startswith("ref_") else -1,
                         np.float32 if k.startswith("ref_") else np.int32) for k in pair_keys})
  out["num_examples"], out["num_truncated"] = np.zeros(num_rows, np.int32), np.zeros(num_rows, np.int32)
  for r, row in enumerate(rows):
    t = 0
    for p, e in enumerate(row):
      for s, side in enumerate(sides[e]):
        n = len(side["inputs"])
        for k in SEQUENCE_KEYS:
          out[k][r, t:t + n] = side[k]
        out["segment_ids"][r, t:t + n] = 2 * p + s + 1
        out["positions"][r, t:t + n] = np.arange(n)
        t += n
      for k in pair_keys:
        out[k][r, p] = examples[e][k]
      out["num_examples"][r] += 1
      out["num_truncated"][r] += examples[e]["num_truncated"]
  return out


def sequence_buckets(num_sequences: int, multiple: int) -> list[int]:
  """The row counts of a step of `num_sequences` packed sequences (pack_sequences): `row_buckets`, capped at
  `num_sequences` when that is a multiple, so a packed step never takes more rows than a row per sequence."""
  buckets = row_buckets(num_sequences, multiple)
  return [b for b in buckets if b < num_sequences] + [num_sequences] if num_sequences % multiple == 0 else buckets


def pair_slots(batch_size: int, seq_len: int) -> int:
  """P, the pair slots of a packed preference row (pack_pairs): the step's pairs, at most what a row's segments can
  hold."""
  return min(batch_size, seq_len // 2)


def sequence_slots(num_sequences: int, seq_len: int) -> int:
  """S, the sequence slots of a packed row from `pack_sequences`: as many as the row could ever hold (one token a
  sequence), at most the sequences there are; so slots never limit the packing, and S is fixed for fixed shapes."""
  return min(num_sequences, seq_len)


def pack_sequences(rows: Mapping[str, np.ndarray], buckets: Sequence[int], index_key: str) -> dict[str, np.ndarray]:
  """Rows of one sequence each (its tokens first: `segment_ids` 1, positions from 0; then padding) -> rows of the same
  length, as many as the smallest bucket that holds the sequences placed first-fit, longest first. Slot s of a row
  is its segment s + 1 (positions restarting at 0). Per-token fields [N, T] keep their values on each sequence's
  tokens, per-sequence fields [N] are repeated over them (0 on padding), and `index_key` [rows, S] (sequence_slots)
  is each slot's input row (-1: unused)."""
  segment_ids_NT = rows["segment_ids"]
  n, seq_len = segment_ids_NT.shape
  lengths_N = np.count_nonzero(segment_ids_NT, axis=1)
  slots = sequence_slots(n, seq_len)
  placed, num_rows = _place(lengths_N, seq_len, slots, buckets, "sequences")
  out = {k: np.zeros((num_rows, seq_len), v.dtype) for k, v in rows.items()}
  out[index_key] = np.full((num_rows, slots), -1, np.int32)
  for r, row in enumerate(placed):
    t = 0
    for s, i in enumerate(row):
      n_i = lengths_N[i]
      for k, v in rows.items():
        out[k][r, t:t + n_i] = v[i, :n_i] if v.ndim == 2 else v[i]
      out["segment_ids"][r, t:t + n_i] = s + 1
      out[index_key][r, s] = i
      t += n_i
  return out
