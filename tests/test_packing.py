"""Packing: rows hold whole chunks of single documents, segment ids 1..n / 0 padding, positions restart per
segment; long documents are split into row-sized chunks; checked against plain-python chunking."""
import collections

import grain
import numpy as np
import pytest

from towerplus_jax.data import packing

SEQ_LEN = 16


def documents(seed=0, n=40):
  """Documents with distinct token values (doc k uses 1000*k + 0, 1, ...), lengths 2..40, some longer than a row."""
  lengths = np.random.default_rng(seed).integers(2, 41, size=n)
  docs = [list(range(1000 * (k + 1), 1000 * (k + 1) + int(n_k))) for k, n_k in enumerate(lengths)]
  masks = [[int(t % 3 != 0) for t in doc] for doc in docs]
  return docs, masks


def examples(docs, masks):
  return grain.MapDataset.source([packing.shifted_example(d, m) for d, m in zip(docs, masks)]).to_iter_dataset()


def expected_chunks(docs, masks):
  """Every document's (inputs, targets, loss_mask) cut into SEQ_LEN pieces, by plain slicing."""
  out = collections.Counter()
  for d, m in zip(docs, masks):
    inputs, targets, mask = d[:-1], d[1:], m[1:]
    for i in range(0, len(inputs), SEQ_LEN):
      out[(tuple(inputs[i:i + SEQ_LEN]), tuple(targets[i:i + SEQ_LEN]), tuple(mask[i:i + SEQ_LEN]))] += 1
  return out


def row_segments(row):
  """(inputs, targets, loss_mask) of each segment of a row, checking ids, positions and padding on the way."""
  seg, pos = row["segment_ids"], row["positions"]
  n = seg.max()
  assert np.all(seg[seg > 0] == np.sort(seg[seg > 0]))  # contiguous runs in order
  assert set(seg[seg > 0]) == set(range(1, n + 1))
  pad = seg == 0
  assert np.all(row["inputs"][pad] == 0) and np.all(row["loss_mask"][pad] == 0) and np.all(pos[pad] == 0)
  if pad.any():
    assert np.all(pad[np.argmax(pad):])  # padding only at the end
  out = []
  for s in range(1, n + 1):
    idx = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
    out.append((tuple(row["inputs"][idx].tolist()), tuple(row["targets"][idx].tolist()),
                tuple(int(x) for x in row["loss_mask"][idx])))
  return out


def test_shifted_example():
  ex = packing.shifted_example([5, 6, 7, 8], [0, 0, 1, 1])
  np.testing.assert_array_equal(ex["inputs"], [5, 6, 7])
  np.testing.assert_array_equal(ex["targets"], [6, 7, 8])
  np.testing.assert_array_equal(ex["loss_mask"], [0, 1, 1])
  assert ex["inputs"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32


@pytest.mark.parametrize("num_bins", [1, 4])
def test_pack_keeps_documents_apart(num_bins):
  docs, masks = documents()
  rows = list(packing.pack(examples(docs, masks), SEQ_LEN, num_bins=num_bins, seed=0))
  got = collections.Counter()
  starts = collections.Counter()
  for row in rows:
    assert set(row) == {"inputs", "targets", "loss_mask", "segment_ids", "positions", "example_start"}
    assert all(v.shape == (SEQ_LEN,) for v in row.values())
    for i in np.flatnonzero(row["example_start"]):  # on a document's first token: 2 when it was split
      assert row["inputs"][i] % 1000 == 0
      starts[int(row["example_start"][i])] += 1
    for inputs, targets, mask in row_segments(row):
      doc = inputs[0] // 1000
      assert all(t // 1000 == doc for t in inputs + targets)  # one document per segment
      assert np.all(np.diff(inputs) == 1) and targets == tuple(t + 1 for t in inputs)  # shifted by one
      got[(inputs, targets, mask)] += 1
  assert got == expected_chunks(docs, masks)
  split = sum(len(d) - 1 > SEQ_LEN for d in docs)
  assert 0 < split < len(docs) and starts == {1: len(docs) - split, 2: split}
  if num_bins > 1:
    assert len(rows) < sum(expected_chunks(docs, masks).values())  # several segments share rows


def test_pack_is_deterministic_for_a_seed():
  docs, masks = documents(seed=1)
  run = lambda seed: [r["inputs"].tolist() for r in packing.pack(examples(docs, masks), SEQ_LEN, 4, seed)]
  assert run(3) == run(3)


def test_pad_one_chunk_per_row():
  docs, masks = documents(seed=2, n=10)
  rows = list(packing.pad(examples(docs, masks), SEQ_LEN))
  got = collections.Counter()
  for row in rows:
    (segment,) = row_segments(row)
    assert row["segment_ids"].max() == 1
    got[segment] += 1
  assert got == expected_chunks(docs, masks)


def test_pad_row_rejects_overlong():
  with pytest.raises(ValueError, match="does not fit"):
    packing.pad_row(packing.shifted_example(list(range(SEQ_LEN + 2)), [1] * (SEQ_LEN + 2)), SEQ_LEN)
