"""Packed preference rows (data.pack=True for dpo / wpo): a packed step holds the unpacked step's pairs, whole pairs
per row, in bucketed row counts; attention never crosses segments; loss, metrics, gradients and reference log-probs
equal the unpacked ones, in one pass or in micro-batches; a tiny WPO run logs the same losses packed and unpacked,
and resumes bit-exact."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import wpo
from test_train_loop import final_params
from towerplus_jax import losses, reference, sharding
from towerplus_jax.data import formats, packing, pipeline
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.run import stage
from towerplus_jax.training import optim, preemption, weights
from towerplus_jax.training import state as state_lib
from towerplus_jax.training.step import StepOptions, make_train_step

SAMPLE = os.path.join(os.path.dirname(pipeline.__file__), "sample", "preferences.jsonl")


def batches(tok, path, pack, steps=2, batch_size=6, seq_len=384, row_multiple=2):
  ds = pipeline.make_dataset("preference", path, tok, seq_len=seq_len, batch_size=batch_size, template="gemma",
                             seed=0, pack=pack, row_multiple=row_multiple)
  it = iter(ds)
  out = [next(it) for _ in range(steps)]
  assert not any(b["num_truncated"].any() for b in out)  # the same pairs, whole, in either layout
  return out


def pairs(batch):
  """record_index -> [(chosen tokens, rejected tokens, ...)] of each pair, whatever the layout."""
  present = pipeline.pairs_present(batch)
  out = {}
  if "chosen_inputs" in batch:
    for b in np.flatnonzero(present):
      out[int(batch["record_index"][b])] = tuple(batch[f"{s}_inputs"][b][batch[f"{s}_segment_ids"][b] > 0].tolist()
                                                 for s in formats.SIDES)
    return out
  for b, p in zip(*np.nonzero(present)):
    seg = batch["segment_ids"][b]
    out[int(batch["record_index"][b, p])] = tuple(batch["inputs"][b][seg == 2 * p + 1 + s].tolist() for s in (0, 1))
  return out


def test_packed_steps_hold_the_unpacked_pairs_whole_in_bucketed_rows(sample_tok):
  for packed, padded in zip(batches(sample_tok, SAMPLE, True), batches(sample_tok, SAMPLE, False)):
    formats.PREFERENCE.check(packed)
    assert formats.PREFERENCE.layout(packed) is formats.PREFERENCE.packed
    assert pairs(packed) == pairs(padded) and len(pairs(packed)) == 6
    rows = packed["inputs"].shape[0]
    assert rows % 2 == 0 and rows in packing.row_buckets(6, 2) and rows < padded["chosen_inputs"].shape[0]
    seg_BT, pos_BT = packed["segment_ids"], packed["positions"]
    for b in range(rows):
      ids = seg_BT[b][seg_BT[b] > 0]
      assert (np.diff(ids) >= 0).all() and (seg_BT[b][len(ids):] == 0).all()  # contiguous segments, padding last
      for s in np.unique(ids):
        np.testing.assert_array_equal(pos_BT[b][seg_BT[b] == s], np.arange((seg_BT[b] == s).sum()))
    assert packed["num_examples"].sum() == 6 and (packed["num_examples"] == (packed["record_index"] >= 0).sum(1)).all()
    assert pipeline.real_positions(packed) == pipeline.real_positions(padded)


@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_row_buckets_are_multiples_that_waste_under_ten_percent(multiple):
  buckets = packing.row_buckets(500, multiple)
  assert buckets[-1] >= 500 and all(b % multiple == 0 for b in buckets) and buckets == sorted(set(buckets))
  for needed in range(10 * multiple + 1, 500):
    chosen = next(b for b in buckets if b >= needed)  # what pack_pairs takes: the smallest that fits
    assert (chosen - needed) / chosen < 0.1, (needed, chosen)


def test_a_pair_too_long_for_a_row_is_cut_to_fit_and_counted():
  side = lambda n: {k: np.arange(n) for k in packing.SEQUENCE_KEYS}
  for (c, r), want in (((10, 20), (10, 20)), ((50, 20), (44, 20)), ((20, 50), (20, 44)), ((50, 40), (32, 32))):
    chosen, rejected, cut = packing.fit_pair(side(c), side(r), 64)
    assert (len(chosen["inputs"]), len(rejected["inputs"])) == want and cut == (c + r > 64)


def model(seed, vocab):
  return Transformer(ModelConfig.tiny("gemma2", vocab_size=vocab), rngs=nnx.Rngs(seed))  # sliding window 8


def test_no_attention_crosses_segments(sample_tok):
  """Each token's hidden state in a packed row is the one it has alone in its own row (sliding and global layers)."""
  net = model(0, sample_tok.vocab_size)
  packed, padded = batches(sample_tok, SAMPLE, True, steps=1)[0], batches(sample_tok, SAMPLE, False, steps=1)[0]
  h_packed = np.asarray(net.hidden(packed["inputs"], packed["positions"], packed["segment_ids"]))
  for s in formats.SIDES:
    h_alone = np.asarray(net.hidden(padded[f"{s}_inputs"], padded[f"{s}_positions"], padded[f"{s}_segment_ids"]))
    for b, index in enumerate(padded["record_index"]):
      r, p = np.argwhere(packed["record_index"] == index)[0]
      seg = packed["segment_ids"][r] == 2 * p + 1 + formats.SIDES.index(s)
      np.testing.assert_allclose(h_packed[r][seg], h_alone[b][padded[f"{s}_segment_ids"][b] > 0], atol=2e-5)


def loss_and_grads(name, net, batch, ref=None, chunk=0):
  cfg = losses.default_config(name)
  cfg.update(beta=0.5, logprob_chunk=chunk)
  loss = losses.get(name)
  if ref is not None:
    batch = {**batch, **loss.reference_fn(ref, batch, cfg)}
  batch = {k: v for k, v in batch.items() if k not in formats.DATA_COUNTS}
  graphdef, params = nnx.split(net)

  def objective(p):
    return loss.fn(nnx.merge(graphdef, p), batch, jax.random.key(0), cfg)
  (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
  return float(value), jax.device_get(metrics), jax.device_get(nnx.to_pure_dict(grads))


def assert_same_metrics(metrics_a, metrics_b):
  """Equal up to float32 rounding at the scale of the summed log-probs (assert_same)."""
  assert set(metrics_a) == set(metrics_b)
  scale = max(abs(metrics_a["logps/chosen"]), abs(metrics_a["logps/rejected"]))
  for k in metrics_a:
    np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=1e-5, atol=1e-7 * scale, err_msg=k)


def assert_same(a, b):
  """Equal up to float32 rounding. Tokens after the first segment of a packed row see their attention sums in
  another order (hidden states within a few ulps), so: rewards, β·(logπ − logπ_ref) with sums near -100, get an
  absolute tolerance at that scale; gradients a relative one on their global norm (single elements that are sums of
  many cancelling terms differ by up to ~1e-4 of the largest)."""
  (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
  assert_same_metrics(metrics_a, metrics_b)
  diff, norm = (np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))
                for tree in (jax.tree.map(np.subtract, grads_a, grads_b), grads_b))
  assert diff <= 1e-5 * norm, (diff, norm)  # float32 rounding: the summation order of attention differs


@pytest.mark.parametrize("name,chunk", [("dpo", 0), ("wpo", 0), ("wpo", 40)])
def test_packed_loss_metrics_and_grads_equal_unpacked_with_a_reference_model(sample_tok, name, chunk):
  net, ref = model(0, sample_tok.vocab_size), model(1, sample_tok.vocab_size)
  for packed, padded in zip(*(batches(sample_tok, SAMPLE, pack, steps=1) for pack in (True, False))):
    assert_same(loss_and_grads(name, net, packed, ref, chunk), loss_and_grads(name, net, padded, ref, chunk))


def test_packed_reference_logps_are_the_unpacked_ones_per_pair(sample_tok):
  ref, cfg = model(1, sample_tok.vocab_size), losses.default_config("wpo")
  packed, padded = batches(sample_tok, SAMPLE, True, steps=1)[0], batches(sample_tok, SAMPLE, False, steps=1)[0]
  got, want = (jax.device_get(losses.get("wpo").reference_fn(ref, b, cfg)) for b in (packed, padded))
  for key in formats.PREFERENCE.reference:
    assert got[key].shape == packed["record_index"].shape and want[key].shape == padded["record_index"].shape
    for b, index in enumerate(padded["record_index"]):
      np.testing.assert_allclose(got[key][packed["record_index"] == index], want[key][b], rtol=1e-5)


@pytest.mark.parametrize("name", ["dpo", "wpo"])
def test_packed_loss_equals_unpacked_with_precomputed_reference(sample_tok, tmp_path, name):
  rng = np.random.default_rng(0)
  with open(SAMPLE, encoding="utf-8") as f:
    records = [{**json.loads(line), "ref_chosen_logp": float(rng.normal() - 30), "ref_rejected_logp":
                float(rng.normal() - 30)} for line in f]
  path = tmp_path / "prefs_ref.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  net = model(0, sample_tok.vocab_size)
  for packed, padded in zip(*(batches(sample_tok, str(path), pack, steps=1) for pack in (True, False))):
    assert set(formats.PREFERENCE.reference) <= set(packed)
    assert_same(loss_and_grads(name, net, packed), loss_and_grads(name, net, padded))


def train_step_metrics(net, ref, batch, micro):
  """One jitted WPO train step (reference model in the state, as a run holds it) on one device: its metrics."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  cfg = losses.default_config("wpo")
  cfg.beta = 0.5
  tx, lr = optim.make(wpo.get_config("tiny").optimizer, 10)
  graphdef, state = state_lib.init(net, tx, mesh, 0, reference=weights.frozen_copy(ref))
  step = jax.jit(make_train_step(graphdef, StepOptions(losses.get("wpo"), cfg, tx, lr, micro)))
  batch = {k: v for k, v in batch.items() if k not in formats.DATA_COUNTS}
  with jax.set_mesh(mesh):
    return jax.device_get(step(state, sharding.shard_global_batch(batch, mesh))[1])


def test_packed_micro_batches_give_the_loss_and_grad_norm_of_one_pass_and_of_unpacked(sample_tok):
  """train.micro_batches=2 on packed rows (rows in multiples of devices x micro-batches, each micro-batch with its
  share of the step's pairs, the loss over the step's pairs): the step of one pass, and of the unpacked rows."""
  net, ref = model(0, sample_tok.vocab_size), model(1, sample_tok.vocab_size)
  packed, padded = (batches(sample_tok, SAMPLE, pack, steps=1, row_multiple=2)[0] for pack in (True, False))
  counts = packed["num_examples"]
  assert len(counts) % 2 == 0 and counts[0::2].any() and counts[1::2].any()  # pairs in both micro-batches
  one, two, unpacked = (train_step_metrics(net, ref, b, m) for b, m in ((packed, 1), (packed, 2), (padded, 1)))
  for other in (two, unpacked):
    assert_same_metrics(other, one)


def test_tiny_wpo_run_logs_the_same_losses_packed(tmp_path):
  logged = {}
  for pack in (False, True):
    c = wpo.get_config("tiny")
    c.data.update(pack=pack, seq_len=384)  # no pair cut in either layout: the same data
    c.train.update(steps=3, log_every=1, checkpoint_every=0)
    c.optimizer.eps = 1e-4  # else Adam moves near-zero gradients by ±lr, rounding noise included (test_train_step)
    stage.train(c, str(tmp_path / str(pack)))
    with open(tmp_path / str(pack) / "metrics.jsonl", encoding="utf-8") as f:
      logged[pack] = [json.loads(line) for line in f]
  for unpacked, packed in zip(logged[False], logged[True]):
    for key in ("loss", "wpo/weight", "grad_norm", "rewards/margins"):
      atol = 1e-5 if key == "rewards/margins" else 1e-6  # a difference of rewards near 0: absolute
      np.testing.assert_allclose(packed[key], unpacked[key], rtol=1e-5, atol=atol, err_msg=key)
    assert packed["data/fill"] > 1.9 * unpacked["data/fill"]  # 3 rows needed, 8 taken: one a device
    assert packed["data/truncated"] == unpacked["data/truncated"] == 0
  assert len(logged[True]) == 3


def test_resume_inside_a_packed_run_is_bit_exact(tmp_path, monkeypatch, sigterm_on_batch):
  c = wpo.get_config("tiny")
  c.data.update(pack=True, seq_len=384)
  c.train.update(steps=4, log_every=1, checkpoint_every=2)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  stage.train(c, a)
  sigterm_on_batch(3)
  with pytest.raises(preemption.Stopped):
    stage.train(c, b)
  monkeypatch.undo()
  stage.train(c, b)  # resumes at step 3 inside the packed stream
  for x, y in zip(jax.tree.leaves(final_params(a)), jax.tree.leaves(final_params(b))):
    np.testing.assert_array_equal(x, y)
  logged = [[json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"), encoding="utf-8")] for w in (a, b)]
  assert [r["loss"] for r in logged[0]] == [r["loss"] for r in logged[1]][-4:]


def test_reference_program_writes_the_same_logps_packed(tmp_path):
  """`python -m towerplus_jax.reference` with data.pack=True: each record gets its own pair's sums (3 pairs a step,
  10 records: a last step of one pair)."""
  prefs = tmp_path / "prefs.jsonl"
  with open(SAMPLE, encoding="utf-8") as f:
    prefs.write_text("".join(f.readline() for _ in range(10)), encoding="utf-8")
  written = {}
  for pack in (False, True):
    c = wpo.get_config("tiny")
    c.data.update(train=str(prefs), seq_len=384, pack=pack)
    c.train.global_batch_size = 3
    out = tmp_path / f"ref_{pack}.jsonl"
    assert reference.precompute(c, str(tmp_path / f"scratch_{pack}"), str(out)) == 10
    written[pack] = [json.loads(line) for line in open(out, encoding="utf-8")]
  for unpacked, packed in zip(written[False], written[True]):
    assert unpacked["prompt"] == packed["prompt"]
    for key in formats.PREFERENCE.reference:
      np.testing.assert_allclose(packed[key], unpacked[key], rtol=1e-6)
