"""The batch formats, declared once: what a training batch of each stage holds (field -> shape letters, dtype,
required). Each loss names its format (`losses.register(..., batch_format=...)`); the pipeline and the rollout
build batches of it, the AOT check builds its abstract batch from it, and the train loop checks the first batch
against it (`BatchFormat.check`: one error naming the field, before anything is traced).

Shape letters: B rows of the global batch, T tokens of a row, P pair slots of a row, S sequence slots of a row;
"" a scalar. Optional fields appear when their producer adds them: reference log-probs (precomputed, else the
trainer adds them with the loss's reference_fn), GRPO's old policy (rl.iterations > 1), the data counts the trainer
pops into `data/*` metrics.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
  shape: str  # one letter per axis (B rows, T tokens); "" = a scalar
  dtype: type  # numpy scalar type
  required: bool = True  # False: present only when its producer adds it


@dataclasses.dataclass(frozen=True)
class BatchFormat:
  name: str
  fields: Mapping[str, Field]
  reference: tuple[str, ...] = ()  # the optional fields a reference model fills (the loss's reference_fn)
  packed: BatchFormat | None = None  # the packed layout of the same data (data.pack=True), told by its first field

  def layout(self, batch: Mapping[str, Any]) -> BatchFormat:
    """This format, or its packed layout when the batch holds the packed layout's first field."""
    return self.packed if self.packed is not None and next(iter(self.packed.fields)) in batch else self

  @property
  def required(self) -> tuple[str, ...]:
    return tuple(k for k, f in self.fields.items() if f.required)

  def check(self, batch: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first field that is missing, unknown, or of the wrong dtype, rank or size."""
    if self.layout(batch) is not self:
      return self.packed.check(batch)
    missing = [k for k in self.required if k not in batch]
    if missing:
      raise ValueError(f"{self.name} batch: missing field(s) {missing}; it has {sorted(batch)}")
    unknown = sorted(set(batch) - set(self.fields))
    if unknown:
      raise ValueError(f"{self.name} batch: unknown field(s) {unknown}; the format has {sorted(self.fields)}")
    sizes: dict[str, int] = {}
    for key, value in batch.items():
      f, shape = self.fields[key], np.shape(value)
      dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
      if dtype != np.dtype(f.dtype) or len(shape) != len(f.shape):
        raise ValueError(f"{self.name} batch: field {key!r} is {dtype.name} {list(shape)}; the format wants "
                         f"{np.dtype(f.dtype).name} [{', '.join(f.shape)}]")
      for letter, n in zip(f.shape, shape):
        if sizes.setdefault(letter, n) != n:
          raise ValueError(f"{self.name} batch: field {key!r} has {letter}={n} where earlier fields have "
                           f"{letter}={sizes[letter]}")

  def abstract(self, sizes: Mapping[str, int], optional: Iterable[str] = ()) -> dict[str, tuple[tuple[int, ...], type]]:
    """(shape, dtype) of the required fields and of the named optional ones, for sizes {letter: n}."""
    keys = set(self.required) | set(optional)
    return {k: (tuple(sizes[c] for c in f.shape), f.dtype) for k, f in self.fields.items() if k in keys}


ROW = {"inputs": Field("BT", np.int32), "targets": Field("BT", np.int32), "loss_mask": Field("BT", np.float32),
       "positions": Field("BT", np.int32), "segment_ids": Field("BT", np.int32)}
SIDES = ("chosen", "rejected")
# Per row: the examples whose start is in it and how many of them did not fit (the trainer pops them).
DATA_COUNTS = {"num_examples": Field("B", np.int32, False), "num_truncated": Field("B", np.int32, False)}

# Packed rows (continued pre-training, SFT): inputs, targets shifted by one, loss_mask (0 on padding; SFT: the
# assistant tokens only), segment_ids (1..n per example, 0 = padding), positions within each example.
LM = BatchFormat("lm", {**ROW, **DATA_COUNTS})
SFT = dataclasses.replace(LM, name="sft")
# Preference pairs: one right-padded row per side; summed reference log-probs of each response; the record's
# position in its source (reference.py writes the log-probs back to it).
PREFERENCE = BatchFormat(
    "preference",
    {**{f"{s}_{k}": f for s in SIDES for k, f in ROW.items()}, "ref_chosen_logp": Field("B", np.float32, False),
     "ref_rejected_logp": Field("B", np.float32, False), "record_index": Field("B", np.int32, False),
     **DATA_COUNTS},
    reference=("ref_chosen_logp", "ref_rejected_logp"),
    # Packed (data.pack=True): whole pairs share rows. Pair p of a row is its segments 2p+1 (chosen) and 2p+2
    # (rejected), positions restarting at 0 in each; the per-pair fields are [B, P] (P pair slots per row, the
    # unused ones with no segment). A step holds the unpacked step's pairs (placed first-fit, longest first).
    packed=BatchFormat(
        "preference_packed",
        {**ROW, "ref_chosen_logp": Field("BP", np.float32, False), "ref_rejected_logp": Field("BP", np.float32, False),
         "record_index": Field("BP", np.int32, False), **DATA_COUNTS},
        reference=("ref_chosen_logp", "ref_rejected_logp")))
# GRPO rollout rows (prompt ⧺ completion, loss on completion tokens), group-relative advantages; with μ > 1 the old
# policy's log-probs and `old_is_current` (1 on a rollout's first update); per-token reference log-probs.
RL_OPTIONAL = {"old_logps": Field("BT", np.float32, False), "old_is_current": Field("", np.int32, False),
               "ref_logps": Field("BT", np.float32, False)}
RL = BatchFormat(
    "rl", {**ROW, "advantages": Field("B", np.float32), **RL_OPTIONAL}, reference=("ref_logps",),
    # Packed (data.pack=True): the rollout's sequences share rows (packing.pack_sequences), slot s of a row its
    # segment s + 1 (positions restarting at 0); `completion_index` [B, S] is each slot's completion in the rollout
    # (-1: unused) and `advantages` are per token, each sequence's on its tokens, so the surrogate reads them as the
    # log-probs (no slot lookup). A step holds the unpacked step's completions.
    packed=BatchFormat(
        "rl_packed", {"completion_index": Field("BS", np.int32), **ROW, "advantages": Field("BT", np.float32),
                      **RL_OPTIONAL}, reference=("ref_logps",)))

FORMATS = {f.name: f for f in (LM, SFT, PREFERENCE, RL)}


def get(name: str) -> BatchFormat:
  if name not in FORMATS:
    raise ValueError(f"unknown batch format {name!r}; use one of {tuple(FORMATS)}")
  return FORMATS[name]
