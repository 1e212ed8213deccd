"""grain pipelines from records to global numpy batches of each batch format (their fields: `formats`).

  lm          formats.LM rows, packed: each document [bos, ...] with targets [..., eos]. Accepts {"text"}, chat
              records (through the chat template) and parallel records ("source\\nreference").
  sft         formats.SFT rows, loss_mask on assistant tokens only (template mask shifted to the targets); packed or
              one example per row. Accepts {"messages"}, {"prompt","completion"} and parallel records (a Tower+
              translation chat).
  preference  formats.PREFERENCE from {"prompt" (string or messages), "chosen", "rejected"}: right-padded rows, loss
              on the response only; the reference log-probs when the records carry them. Prompts keep their last
              `max_prompt_len` tokens; responses are cut to fit the row. Packed (formats.PREFERENCE.packed): the
              step's pairs share rows, both sides of a pair in one row (cut to fit it: packing.fit_pair).
  Data counts (lm, sft, preference): `num_examples` / `num_truncated` per row: the examples whose start is in it
  and how many of them did not fit (lm/sft: longer than the row, split; preference: prompt longer than
  max_prompt_len or prompt + response longer than the row, cut). The trainer pops them into `data/*` metrics
  (`DataCounts`).
  rl          prompts, not training rows (the rollout makes formats.RL rows from them): {"prompt", + any columns}
              or parallel records (prompt = the Tower+ translation prompt with the record's IF-MT rules as
              instructions, added to the record): `records` (list of dicts), int32 `prompt_tokens` [B, P]
              right-padded with pad_id (chat template + generation prompt), `prompt_lengths` [B], `num_dropped`
              (int): prompts longer than P dropped while filling this batch (also logged).

Records are shuffled per epoch from `seed` and repeated for training; `iter(dataset)` is a grain DatasetIterator
whose get_state/set_state resume exactly. Without repeat the last batch is padded with empty rows (segment_ids 0)
so shapes stay fixed (rl: a smaller last batch).

Multi-host: every host runs this same pipeline and gets the same *global* batch (`batch_size` = all hosts' rows);
`sharding.shard_global_batch` then places on each host's devices only the rows they hold. So the batch of step s is
a pure function of (data config, seed, s) whatever the host count, the iterator state is the same on every host,
and a checkpoint resumes on any host count. The price: each host reads, tokenizes and packs the whole global batch
(n times the work of a per-host split). Tokenizing a 256 x 2048 batch takes a fraction of a second on the host's
threads, far below a training step at that size, so we keep the simple scheme; a per-row deterministic packer over
global index ranges would remove the duplication at the cost of packing quality and much more code.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from towerplus_jax.data import chat, formats, packing, records
from towerplus_jax.data.sources import RecordSource, open_source
from towerplus_jax.data.tokenizers import Tokenizer

MIN_PACKING_BINS = 32


def is_parallel(record: dict) -> bool:
  return "source" in record and "reference" in record


def parallel_to_messages(record: dict) -> dict:
  """{"source","reference","src_lang","tgt_lang"} (language names) -> {"messages"}: the Tower+ translation prompt as
  the user turn, the reference as the assistant turn."""
  prompt = chat.translation_request(record)
  return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["reference"]}]}


def is_chat(record: dict) -> bool:
  return "messages" in record or ("prompt" in record and "completion" in record)


def chat_messages(record: dict) -> list[dict]:
  """The conversation of a chat, prompt/completion or parallel record."""
  if is_chat(record):
    return chat.to_messages(record)
  if is_parallel(record):
    return parallel_to_messages(record)["messages"]
  raise ValueError("no conversation: need 'messages', 'prompt'+'completion' or 'source'+'reference'; the record "
                   f"has keys {sorted(record)}")


@dataclasses.dataclass(frozen=True)
class Encoder:
  """Record -> tokenized example of one batch format (before packing/padding/batching)."""
  kind: str
  tokenizer: Tokenizer
  template: str
  seq_len: int
  max_prompt_len: int
  pack: bool = False  # preference: both sides of a pair cut to share a row (packing.fit_pair)

  def __call__(self, index: int, record: dict) -> dict:
    records.check(self.kind, record)
    example = getattr(self, f"_{self.kind}")(record)
    if self.kind == "preference":
      example["record_index"] = np.int32(index)  # position in the source: reference rows find their record by it
    return example

  def _lm(self, record: dict) -> dict:
    tok = self.tokenizer
    bos = [] if tok.bos_id is None else [tok.bos_id]
    if "text" in record:
      ids = bos + tok.encode(record["text"])
    elif is_parallel(record) and not is_chat(record):
      ids = bos + tok.encode(f"{record['source']}\n{record['reference']}")
    else:
      ids, _ = chat.encode_chat(tok, self.template, chat_messages(record))
    ids = ids + [tok.eos_id]
    return packing.shifted_example(ids, [1] * len(ids))

  def _sft(self, record: dict) -> dict:
    ids, mask = chat.encode_chat(self.tokenizer, self.template, chat_messages(record))
    if not any(mask):
      raise ValueError("the conversation has no assistant turn to train on")
    return packing.shifted_example(ids, mask)

  def _preference(self, record: dict) -> dict:
    prompt = chat.as_messages(record["prompt"], "user")
    prompt_ids, _ = chat.encode_chat(self.tokenizer, self.template, prompt, add_generation_prompt=True)
    example, cut = {}, len(prompt_ids) > self.max_prompt_len
    for side in formats.SIDES:
      ids, mask = chat.encode_chat(self.tokenizer, self.template, prompt + chat.as_messages(record[side], "assistant"))
      if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"'{side}' must be assistant turns that continue the prompt")
      response, response_mask = ids[len(prompt_ids):], mask[len(prompt_ids):]
      kept = prompt_ids[-self.max_prompt_len:]
      cut |= len(kept) + len(response) > self.seq_len + 1
      ids = (kept + response)[:self.seq_len + 1]
      mask = ([0] * len(kept) + response_mask)[:self.seq_len + 1]
      example[side] = packing.shifted_example(ids, mask)
    if self.pack:
      example["chosen"], example["rejected"], cut_pair = packing.fit_pair(example["chosen"], example["rejected"],
                                                                         self.seq_len)
      cut |= cut_pair
    example = {f"{side}_{k}": v for side in formats.SIDES for k, v in example[side].items()}
    example.update(num_examples=np.int32(1), num_truncated=np.int32(cut))
    for key in formats.PREFERENCE.reference:
      value = record.get(key)
      example[key] = np.float32("nan" if value is None else value)
    return example

  def _rl(self, record: dict) -> dict:
    if "prompt" not in record and is_parallel(record):
      record = {**record, "prompt": chat.translation_request(record)}
    messages = chat.as_messages(record["prompt"], "user")
    ids, _ = chat.encode_chat(self.tokenizer, self.template, messages, add_generation_prompt=True)
    return {"record": record, "prompt_tokens": np.asarray(ids, np.int32)}


class PromptFits:
  """Filter: keeps rl examples whose prompt has at most `max_len` tokens, logging how many it dropped. Raises once
  `give_up_after` were dropped and none kept: that many consecutive elements span a whole epoch, so no prompt fits
  (and a repeated dataset would never yield)."""

  def __init__(self, max_len: int, give_up_after: int):
    self.max_len, self.give_up_after = max_len, give_up_after
    self.dropped = self.kept = self.pending = 0

  def take_pending(self) -> int:
    """Prompts dropped since the last call (the batch being built: the filter runs on the consuming thread)."""
    n, self.pending = self.pending, 0
    return n

  def __call__(self, example: dict) -> bool:
    if len(example["prompt_tokens"]) <= self.max_len:
      self.kept += 1
      return True
    self.dropped += 1
    self.pending += 1
    if not self.kept and self.dropped >= self.give_up_after:
      raise ValueError(f"rl data: every prompt is longer than max_prompt_len={self.max_len} tokens")
    if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...
      logging.warning("rl data: dropped %d prompt(s) longer than max_prompt_len=%d tokens so far", self.dropped,
                      self.max_len)
    return False


def _located(source: RecordSource, encode: Encoder):
  """`encode` with its errors prefixed by where the record comes from (file:line)."""

  def fn(index: int, record: dict) -> dict:
    try:
      return encode(index, record)
    except KeyError as e:
      raise ValueError(f"{source.locate(index)}: missing key {e.args[0]!r} (the record has keys "
                       f"{sorted(record)})") from e
    except (ValueError, TypeError) as e:
      raise ValueError(f"{source.locate(index)}: {e}") from e

  return fn


def _rl_batch(examples: Sequence[dict], max_prompt_len: int, pad_id: int, fits: PromptFits) -> dict:
  tokens_BP = np.full((len(examples), max_prompt_len), pad_id, np.int32)
  for i, e in enumerate(examples):
    tokens_BP[i, :len(e["prompt_tokens"])] = e["prompt_tokens"]
  return {"records": [e["record"] for e in examples], "prompt_tokens": tokens_BP,
          "prompt_lengths": np.asarray([len(e["prompt_tokens"]) for e in examples], np.int32),
          "num_dropped": fits.take_pending()}


def _example_counts(batch: dict) -> dict:
  """Packed/padded rows: the per-token `example_start` marks -> per-row `num_examples` / `num_truncated`."""
  start_BT = batch.pop(packing.START)
  return {**batch, "num_examples": (start_BT > 0).sum(1, dtype=np.int32),
          "num_truncated": (start_BT == 2).sum(1, dtype=np.int32)}


class DataCounts:
  """The examples truncated to fit their rows and the rows' fill, counted on the batches the trainer consumes (so
  exact whatever grain prefetches, and global: every host builds the whole global batch). `take` pops the count keys
  (module docstring) and warns when truncations first appear (then at 2, 4, 8, ...); `metrics` gives the figures
  since its last call."""

  def __init__(self):
    self.examples = self.truncated = self.total = 0
    self.real = self.positions = 0

  def take(self, batch: dict) -> dict:
    self.real, self.positions = self.real + real_positions(batch), self.positions + _positions(batch)
    if "num_truncated" not in batch:
      return batch
    batch = dict(batch)
    self.examples += int(batch.pop("num_examples").sum())
    n = int(batch.pop("num_truncated").sum())
    self.truncated += n
    before, self.total = self.total, self.total + n
    if before.bit_length() < self.total.bit_length():  # passed 1, 2, 4, 8, ...
      logging.warning("data: %d example(s) so far did not fit a row of %d tokens and were cut (%s)", self.total,
                      _row_len(batch), _FIX["record_index" in batch])
    return batch

  def metrics(self) -> dict[str, float]:
    """data/fill (real tokens / token positions of the rows), data/truncated (examples) and data/truncated_frac
    since the last call; {} when no batch came."""
    out = {"data/fill": self.real / self.positions} if self.positions else {}
    if self.examples:
      out.update({"data/truncated": float(self.truncated), "data/truncated_frac": self.truncated / self.examples})
    self.examples = self.truncated = self.real = self.positions = 0
    return out


def real_positions(batch: dict) -> int:
  """The token positions of a batch's rows that hold a real token (segment id > 0)."""
  return int(sum(np.count_nonzero(v) for k, v in batch.items() if k.endswith("segment_ids")))


def _positions(batch: dict) -> int:
  return int(sum(np.size(v) for k, v in batch.items() if k.endswith("segment_ids")))


_FIX = {False: "split into row-sized pieces that lose their context: raise data.seq_len or shorten those records",
        True: "prompts keep their last data.max_prompt_len tokens, responses are cut at the row's end: raise "
              "data.max_prompt_len / data.seq_len or shorten those records"}


def _row_len(batch: dict) -> int:
  return batch["chosen_inputs" if "chosen_inputs" in batch else "inputs"].shape[1]


def pairs_present(batch: dict) -> np.ndarray:
  """bool, the shape of the batch's per-pair fields: which hold a pair (not a padding row or an unused slot)."""
  if "chosen_segment_ids" in batch:
    return batch["chosen_segment_ids"].any(axis=1)
  return batch["record_index"] >= 0


def _reference_logps(batch: dict) -> dict:
  """Keep ref_*_logp when every pair has it; drop it when none has; else raise. Padding rows (a last, partial
  batch) and unused slots of packed rows count as neither."""
  present = pairs_present(batch)
  for key in formats.PREFERENCE.reference:
    missing = np.isnan(batch[key]) & present
    if (missing == present).all():
      del batch[key]
    elif missing.any():
      raise ValueError(f"some preference records have {key} and some do not; give it for all or none")
    else:
      batch[key] = np.where(present, batch[key], 0.0).astype(np.float32)
  return batch


def _pad_sides(example: dict, seq_len: int) -> dict:
  """A preference example's sides as right-padded rows (formats.PREFERENCE)."""
  padded = {k: v for k, v in example.items() if not k.startswith(formats.SIDES)}
  for side in formats.SIDES:
    row = packing.pad_row({k: example[f"{side}_{k}"] for k in packing.SEQUENCE_KEYS}, seq_len)
    padded.update({f"{side}_{k}": v for k, v in row.items()})
  return padded


def _check_tokenizer(tokenizer: Tokenizer, template: str) -> None:
  """Fail early (not per record) when the tokenizer lacks the template's special tokens."""
  chat.stop_ids(tokenizer, template)
  chat.encode_chat(tokenizer, template, [{"role": "user", "content": "x"}], add_generation_prompt=True)


def make_dataset(kind: str, sources: str | Sequence[str] | RecordSource, tokenizer: Tokenizer, *, seq_len: int,
                 batch_size: int, template: str, seed: int, shuffle: bool = True, repeat: bool = True,
                 pack: bool = True, max_prompt_len: int | None = None, num_threads: int = 4,
                 row_multiple: int = 1) -> grain.IterDataset:
  """A grain dataset of global batches (`batch_size` rows, the same on every host) of format `kind` (module
  docstring). max_prompt_len (preference, rl): default seq_len // 2. Packed preference batches hold `batch_size`
  pairs in a multiple of `row_multiple` rows (the devices the batch is split over), from packing.row_buckets.
  """
  formats.get(kind)  # raises on an unknown format
  max_prompt_len = max_prompt_len or seq_len // 2
  if kind == "preference" and max_prompt_len >= seq_len:
    raise ValueError(f"max_prompt_len={max_prompt_len} leaves no room for responses in rows of {seq_len} tokens")
  source = sources if hasattr(sources, "locate") else open_source(sources)
  if kind != "lm":
    _check_tokenizer(tokenizer, template)

  encode = Encoder(kind, tokenizer, template, seq_len, max_prompt_len, pack=pack)
  ds = grain.MapDataset.source(source).map_with_index(_located(source, encode))
  num_records, prefetch = len(ds), 4 * batch_size
  if shuffle:
    ds = ds.shuffle(seed)
  if repeat:
    ds = ds.repeat()
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))

  if kind == "rl":  # filtered after the prefetch, so its count is the batch's; 2 epochs dropped in a row, none kept
    fits = PromptFits(max_prompt_len, 2 * num_records)
    return it.filter(fits).batch(batch_size, batch_fn=functools.partial(
        _rl_batch, max_prompt_len=max_prompt_len, pad_id=tokenizer.pad_id, fits=fits))
  if kind == "preference" and pack:
    pack_fn = functools.partial(packing.pack_pairs, seq_len=seq_len, slots=packing.pair_slots(batch_size, seq_len),
                                buckets=packing.row_buckets(batch_size, row_multiple),
                                pair_keys=("record_index", *formats.PREFERENCE.reference))
    return it.batch(batch_size, batch_fn=pack_fn).map(_reference_logps)
  if kind == "preference":
    it = it.map(functools.partial(_pad_sides, seq_len=seq_len))
  elif pack:
    it = packing.pack(it, seq_len, max(batch_size, MIN_PACKING_BINS), seed, shuffle_bins=shuffle)
  else:
    it = packing.pad(it, seq_len)
  batched = it.batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
  return batched.map(_reference_logps if kind == "preference" else _example_counts)
