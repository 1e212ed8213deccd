"""Packed GRPO rollout rows (data.pack=True for grpo): a packed rollout holds every completion whole, in bucketed row
counts; attention never crosses segments; loss, metrics, counts and gradients equal the unpacked ones in every
aggregation mode, with old log-probs and with the KL reference; a tiny GRPO run logs the same losses packed and
unpacked, at a higher data/fill."""
import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_step import opt_cfg

from configs import grpo
from towerplus_jax import losses, sharding
from towerplus_jax.data import formats, packing, pipeline
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.rl import rollout
from towerplus_jax.rl.replay import ReplayBuffer
from towerplus_jax.run import stage
from towerplus_jax.training import optim
from towerplus_jax.training import state as state_lib
from towerplus_jax.training.step import StepOptions, make_train_step

N, P, C, V = 12, 10, 6, 64  # completions, max prompt and completion tokens (rows of 16), vocab
MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
BUCKETS = packing.sequence_buckets(N, 2)


def rollout_rows(seed=0):
  """Unpacked rollout rows (rollout.training_rows) of prompts and completions of random lengths, one completion
  masked (truncated), one empty; advantages of both signs; sampler log-probs as old_logps."""
  rng = np.random.default_rng(seed)
  prompt_lengths, completion_lengths = rng.integers(2, P + 1, N), rng.integers(1, C + 1, N)
  completion_lengths[1] = 0
  keep = np.ones(N, np.float32)
  keep[2] = 0.0
  rows = rollout.training_rows(rng.integers(1, V, (N, P)), prompt_lengths, rng.integers(1, V, (N, C)),
                               completion_lengths, -rng.uniform(0.5, 4.0, (N, C)).astype(np.float32), keep, pad_id=0)
  rows["advantages"] = rng.normal(size=N).astype(np.float32)
  return rows


def pack(rows):
  return packing.pack_sequences(rows, BUCKETS, index_key="completion_index")


def test_packed_rows_hold_every_completion_whole_in_bucketed_rows():
  rows = rollout_rows()
  packed = pack(rows)
  formats.RL.check(packed)
  assert formats.RL.layout(packed) is formats.RL.packed
  num_rows = packed["inputs"].shape[0]
  assert num_rows in BUCKETS and num_rows < N and num_rows % 2 == 0
  assert packed["completion_index"].shape == (num_rows, packing.sequence_slots(N, P + C))
  placed = packed["completion_index"][packed["completion_index"] >= 0]
  assert sorted(placed.tolist()) == list(range(N))
  for b, s in zip(*np.nonzero(packed["completion_index"] >= 0)):
    i = packed["completion_index"][b, s]
    seg, alone = packed["segment_ids"][b] == s + 1, rows["segment_ids"][i] > 0
    for key in ("inputs", "targets", "loss_mask", "old_logps"):
      np.testing.assert_array_equal(packed[key][b][seg], rows[key][i][alone], err_msg=key)
    np.testing.assert_array_equal(packed["positions"][b][seg], np.arange(alone.sum()))
    assert (packed["advantages"][b][seg] == rows["advantages"][i]).all()
  for b in range(num_rows):
    ids = packed["segment_ids"][b][packed["segment_ids"][b] > 0]
    assert (np.diff(ids) >= 0).all() and (packed["segment_ids"][b][len(ids):] == 0).all()  # contiguous, padding last
    assert not packed["advantages"][b][packed["segment_ids"][b] == 0].any()
  assert pipeline.real_positions(packed) == pipeline.real_positions(rows)


@pytest.mark.parametrize("sequences,multiple", [(64, 1), (64, 8), (12, 8), (500, 4)])
def test_sequence_buckets_never_exceed_a_row_per_sequence_when_they_can(sequences, multiple):
  buckets = packing.sequence_buckets(sequences, multiple)
  assert all(b % multiple == 0 for b in buckets) and buckets == sorted(set(buckets)) and buckets[-1] >= sequences
  assert set(buckets) - {buckets[-1]} <= set(packing.row_buckets(sequences, multiple))
  if sequences % multiple == 0:
    assert buckets[-1] == sequences


def test_replay_buffer_resumes_a_packed_rollout_exactly():
  """μ = 2, saved between the updates: the restored buffer yields the same packed batch, of formats.RL.packed."""
  held = ReplayBuffer(2)
  held.put(rollout.Rollout(pack(rollout_rows()), {}, [], [], np.zeros(N)))
  first = held.take()
  restored = ReplayBuffer(2)
  restored.set_state(json.loads(json.dumps(held.get_state())))
  second = restored.take()
  formats.RL.check(second)
  assert (first["old_is_current"], second["old_is_current"]) == (1, 0) and not len(restored)
  for key, value in held.batch.items():
    np.testing.assert_array_equal(second[key], value, err_msg=key)
    assert second[key].dtype == value.dtype


def model(seed):
  return Transformer(ModelConfig.tiny("gemma2", vocab_size=V), rngs=nnx.Rngs(seed))  # sliding window 8


def test_no_attention_crosses_segments():
  """Each token's hidden state in a packed row is the one it has alone in its own row (sliding and global layers)."""
  net, rows = model(0), rollout_rows()
  packed = pack(rows)
  h_packed, h_alone = (np.asarray(net.hidden(b["inputs"], b["positions"], b["segment_ids"])) for b in (packed, rows))
  for b, s in zip(*np.nonzero(packed["completion_index"] >= 0)):
    i = packed["completion_index"][b, s]
    np.testing.assert_allclose(h_packed[b][packed["segment_ids"][b] == s + 1], h_alone[i][rows["segment_ids"][i] > 0],
                               atol=2e-5)


def test_policy_and_reference_logps_of_packed_rows_are_the_unpacked_ones():
  """Per-token, so packing the unpacked rows' log-probs gives the packed rows' (μ > 1 old policy, KL reference)."""
  net, rows, cfg = model(0), rollout_rows(), losses.default_config("grpo")
  packed = pack(rows)
  want = pack({**rows, "logp": np.asarray(losses.grpo.policy_logps(net, rows, cfg))})["logp"]
  got = losses.get("grpo").reference_fn(net, packed, cfg)["ref_logps"]
  tokens = packed["segment_ids"] > 0  # padding has log-probs too, of no sequence
  np.testing.assert_allclose(np.asarray(got)[tokens], want[tokens], rtol=1e-5, atol=1e-5)


def grpo_cfg(mode, beta):
  cfg = losses.default_config("grpo")
  cfg.update(aggregation=mode, beta=beta, max_completion_len=C, temperature=0.7, epsilon_high=0.28)
  return cfg


def global_norm(tree):
  return np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))


def loss_and_grads(net, ref, batch, mode, beta, old):
  """GRPO loss, metrics, global counts and gradients of `batch` (its old_logps kept when `old`)."""
  cfg = grpo_cfg(mode, beta)
  loss = losses.get("grpo")
  batch = {k: v for k, v in batch.items() if old or k != "old_logps"}
  if beta:
    batch = {**batch, **loss.reference_fn(ref, batch, cfg)}
  counts = jax.device_get(losses.global_counts(loss, batch, cfg))
  graphdef, params = nnx.split(net)
  (value, metrics), grads = jax.value_and_grad(
      lambda p: loss.fn(nnx.merge(graphdef, p), batch, jax.random.key(0), cfg), has_aux=True)(params)
  return float(value), {**jax.device_get(metrics), **counts}, jax.device_get(nnx.to_pure_dict(grads))


def old_logps(net, rows):
  """The rows' policy log-probs shifted so the ratios are far from 1 on both sides (clipping bites)."""
  logp_NT = np.asarray(losses.grpo.policy_logps(net, rows, losses.default_config("grpo")))
  shift_NT = np.random.default_rng(1).choice(np.log([0.5, 0.9, 1.05, 1.5]), size=logp_NT.shape)
  return (logp_NT - shift_NT).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta,old", [(0.0, False), (0.04, True)])
def test_packed_loss_metrics_counts_and_grads_equal_unpacked(mode, beta, old):
  net, ref, rows = model(0), model(1), rollout_rows()
  rows["old_logps"] = old_logps(net, rows)
  (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = (
      loss_and_grads(net, ref, batch, mode, beta, old) for batch in (pack(rows), rows))
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
  assert set(metrics_a) == set(metrics_b) and ("kl" in metrics_a) == bool(beta)
  if old:
    assert 0 < metrics_a["clip_ratio/region_mean"] < 1
  for k in metrics_a:
    np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=1e-5, atol=1e-7, err_msg=k)
  want = {"token_mean": rows["loss_mask"].sum(), "seq_mean_token_mean": N, "seq_mean_token_sum_norm": N}[mode]
  assert metrics_a["loss_denominator"] == want and metrics_a["rows_with_tokens"] == N - 2  # empty, masked
  diff, norm = global_norm(jax.tree.map(np.subtract, grads_a, grads_b)), global_norm(grads_b)
  assert diff <= 1e-5 * norm, (diff, norm)  # float32 rounding: the summation order of attention differs


def test_micro_batched_packed_train_step_has_the_unpacked_metrics():
  """Through the train step with 2 micro-batches (global counts in each, the [B, S] slots split with their rows)."""
  net, rows = model(0), rollout_rows()
  rows["old_logps"] = old_logps(net, rows)
  mode = "seq_mean_token_mean"
  _, want, grads = loss_and_grads(net, None, rows, mode, 0.0, True)
  tx, lr = optim.make(opt_cfg(), 10)
  graphdef, state = state_lib.init(net, tx, sharding.make_mesh({}, jax.devices()[:1]), seed=0)
  step = make_train_step(graphdef, StepOptions(losses.get("grpo"), grpo_cfg(mode, 0.0), tx, lr, micro_batches=2))
  _, got = jax.jit(step)(state, pack(rows))
  np.testing.assert_allclose(float(got["grad_norm"]), global_norm(grads), rtol=1e-5)
  for key in ("loss", "entropy", "ratio/mean", "clip_ratio/region_mean"):
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, err_msg=key)


def run_grpo(tmp_path, pack):
  c = grpo.get_config("tiny")
  c.data.update(train="sample:copy", pack=pack)
  c.rl.update(rewards=("chrf",), reward_weights=(1.0,), max_completion_len=6, num_generations=4, prompts_per_step=4,
              iterations=2)
  c.train.update(steps=2, log_every=1, checkpoint_every=0)
  c.optimizer.eps = 1e-4  # else Adam moves near-zero gradients by ±lr, rounding noise included (test_train_step)
  workdir = tmp_path / str(pack)
  stage.train(c, str(workdir))
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_tiny_grpo_run_logs_the_same_losses_packed(tmp_path):
  """μ = 2: the rollout's first update (ratio 1), then its second (old log-probs from the forward pass on packed
  rows, the batch from the replay buffer): the same losses and metrics step by step, at a higher fill."""
  unpacked, packed = (run_grpo(tmp_path, pack) for pack in (False, True))
  assert len(packed) == len(unpacked) == 2
  for a, b in zip(packed, unpacked):
    assert a["reward/mean"] == b["reward/mean"]
    for key in ("loss", "entropy", "ratio/mean", "clip_ratio/region_mean", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert a["data/fill"] > 1.9 * b["data/fill"]  # 16 sequences: 6 rows needed, 8 taken (one a device), not 16
