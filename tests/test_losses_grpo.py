"""GRPO loss and metrics vs a numpy reference for every aggregation; ratio 1; zero-std groups; k3 KL; micro-batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_lm import FakeLM, np_log_softmax
from test_train_step import opt_cfg

from towerplus_jax import losses, sharding
from towerplus_jax.losses import grpo
from towerplus_jax.training import optim
from towerplus_jax.training import state as state_lib
from towerplus_jax.training.step import StepOptions, make_train_step

B, T, V, PROMPT = 4, 7, 6, 2
MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
TEMPERATURE = 0.7


def np_logps(table, batch, temperature=TEMPERATURE):
  logp_all = np_log_softmax(table[batch["inputs"]] / temperature)
  return np.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0], logp_all


def make_batch(seed=0):
  """Ratios far from 1 on both sides, advantages of both signs; row 3 is a masked truncated completion."""
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(B * T, V)) * 2
  mask = np.zeros((B, T), np.float32)
  for row, n in enumerate((5, 3, 4, 0)):
    mask[row, PROMPT:PROMPT + n] = 1.0
  batch = {
      "inputs": np.arange(B * T, dtype=np.int32).reshape(B, T),
      "targets": rng.integers(0, V, (B, T)).astype(np.int32),
      "loss_mask": mask,
      "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
      "segment_ids": np.ones((B, T), np.int32),
      "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32),
  }
  logp, _ = np_logps(table, batch)
  ratio = rng.choice([0.5, 0.9, 1.05, 1.5], size=(B, T))
  batch["old_logps"] = (logp - np.log(ratio)).astype(np.float32)
  batch["ref_logps"] = (logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
  return table, batch


def cfg(**kw):
  c = losses.default_config("grpo")
  c.update({"temperature": TEMPERATURE, "max_completion_len": T - PROMPT, **kw})
  return c


def np_aggregate(x, mask, mode, max_len):
  if mode == "token_mean":
    return (x * mask).sum() / mask.sum()
  if mode == "seq_mean_token_mean":
    return ((x * mask).sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
  return ((x * mask).sum(-1) / max_len).mean()


def np_metric(x, mask, mode):
  """Token mean (token_mean), else the mean of per-sequence token means over the rows that have tokens."""
  if mode == "token_mean":
    return (x * mask).sum() / mask.sum()
  has = mask.sum(-1) > 0
  return ((x * mask).sum(-1)[has] / mask.sum(-1)[has]).mean()


def np_reference(table, batch, mode, beta, eps_low, eps_high):
  logp, logp_all = np_logps(table, batch)
  old = batch.get("old_logps", logp)
  ratio = np.exp(logp - old)
  adv = batch["advantages"][:, None].astype(np.float64)
  delta = batch["ref_logps"] - logp
  kl = np.exp(delta) - delta - 1
  per_token = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv) + beta * kl
  m = batch["loss_mask"]
  low = (ratio < 1 - eps_low) & (adv < 0)
  high = (ratio > 1 + eps_high) & (adv > 0)
  ent = -(np.exp(logp_all) * logp_all).sum(-1)
  metric = lambda x: np_metric(x.astype(np.float64), m, mode)
  loss = np_aggregate(per_token, m, mode, T - PROMPT)
  return low, high, {"loss": loss, "kl": metric(kl), "entropy": metric(ent), "ratio/mean": metric(ratio),
                     "clip_ratio/low_mean": metric(low),
                     "clip_ratio/high_mean": metric(high), "clip_ratio/region_mean": metric(low | high)}


@pytest.mark.parametrize("mode", MODES)
def test_loss_and_metrics_match_numpy(mode):
  table, batch = make_batch()
  c = cfg(aggregation=mode, beta=0.04, epsilon_high=0.28)
  loss, metrics = losses.get("grpo").fn(FakeLM(table), batch, jax.random.key(0), c)
  low, high, want = np_reference(table, batch, mode, 0.04, 0.2, 0.28)
  m = batch["loss_mask"] > 0
  assert (low & m).any() and (high & m).any()  # clipping triggers on both sides
  assert set(metrics) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)
  assert float(losses.loss_denominator("grpo", batch, c)) == (m.sum() if mode == "token_mean" else B)


def test_ratio_one_without_old_logps_is_policy_gradient():
  table, batch = make_batch()
  batch = {k: v for k, v in batch.items() if k not in ("old_logps", "ref_logps")}
  c = cfg()
  fn = lambda t: losses.get("grpo").fn(FakeLM(t), batch, None, c)
  loss, metrics = fn(table)
  logp, _ = np_logps(table, batch)
  m = batch["loss_mask"]
  np.testing.assert_allclose(float(loss), -(batch["advantages"][:, None] * m).sum() / m.sum(), rtol=1e-6)
  assert float(metrics["clip_ratio/region_mean"]) == 0.0 and "kl" not in metrics

  def pg(t):  # -Σ A·logπ / n, written directly
    logp_all = jax.nn.log_softmax(t[batch["inputs"]] / TEMPERATURE)
    lp = jnp.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0]
    return -jnp.sum(batch["advantages"][:, None] * lp * m) / m.sum()

  np.testing.assert_allclose(np.asarray(jax.grad(lambda t: fn(t)[0])(jnp.asarray(table))),
                             np.asarray(jax.grad(pg)(jnp.asarray(table))), rtol=1e-5, atol=1e-8)


def test_old_is_current_takes_the_current_logps():
  """A rollout's first update (old_is_current = 1) ignores old_logps: loss, metrics and gradient as without them."""
  table, batch = make_batch()
  fn = lambda b: jax.value_and_grad(lambda t: losses.get("grpo").fn(FakeLM(t), b, None, cfg()), has_aux=True)(
      jnp.asarray(table))
  without = fn({k: v for k, v in batch.items() if k != "old_logps"})
  for flag, want in ((1, without), (0, fn(batch))):
    got = fn({**batch, "old_is_current": np.int32(flag)})
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    for key, value in want[0][1].items():
      assert float(got[0][1][key]) == float(value), (flag, key)
  assert float(without[0][1]["ratio/mean"]) == 1.0 and float(fn(batch)[0][1]["ratio/mean"]) != 1.0


@pytest.mark.parametrize("mode", MODES)
def test_zero_std_group_leaves_only_kl(mode):
  table, batch = make_batch()
  batch["advantages"] = np.zeros(B, np.float32)
  fn = lambda c: losses.get("grpo").fn(FakeLM(table), batch, None, c)
  loss, _ = fn(cfg(aggregation=mode, beta=0.0))
  assert float(loss) == 0.0
  g = jax.grad(lambda t: losses.get("grpo").fn(FakeLM(t), batch, None, cfg(aggregation=mode))[0])(jnp.asarray(table))
  assert not np.any(np.asarray(g))
  loss, _ = fn(cfg(aggregation=mode, beta=0.04))
  _, _, want = np_reference(table, batch, mode, 0.04, 0.2, 0.2)
  np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)
  assert float(loss) > 0


def test_k3_kl_zero_when_reference_is_policy():
  table, batch = make_batch()
  ref = losses.get("grpo").reference_fn(FakeLM(table), batch, cfg())
  logp, _ = np_logps(table, batch)
  np.testing.assert_allclose(np.asarray(ref["ref_logps"]), logp, rtol=1e-5)
  batch.update(ref)
  with_kl = losses.get("grpo").fn(FakeLM(table), batch, None, cfg(beta=0.1))
  without = losses.get("grpo").fn(FakeLM(table), batch, None, cfg(beta=0.0))
  assert float(with_kl[1]["kl"]) == 0.0
  np.testing.assert_allclose(float(with_kl[0]), float(without[0]), rtol=1e-6)
  x = np.linspace(-3, 3, 13)
  assert np.all(np.asarray(grpo.k3_kl(jnp.asarray(x), jnp.asarray(x[::-1]))) >= 0)


def test_reference_needed_only_with_beta():
  grpo_loss = losses.get("grpo")
  assert not grpo_loss.needs_reference(cfg()) and grpo_loss.needs_reference(cfg(beta=0.04))
  table, batch = make_batch()
  del batch["ref_logps"]
  with pytest.raises(KeyError, match="ref_logps"):
    grpo_loss.fn(FakeLM(table), batch, None, cfg(beta=0.04))
  with pytest.raises(ValueError, match="aggregation"):
    grpo_loss.fn(FakeLM(table), batch, None, cfg(aggregation="seq_sum"))
  with pytest.raises(ValueError, match="max_completion_len=0: must be >= 1"):
    grpo_loss.fn(FakeLM(table), batch, None, cfg(aggregation="seq_mean_token_sum_norm", max_completion_len=0))


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_denominator_equal_full_batch(mode):
  table, batch = make_batch(1)
  c = cfg(aggregation=mode, beta=0.04)
  fn = losses.get("grpo").fn

  def run(b):
    (loss, metrics), grad = jax.jit(jax.value_and_grad(lambda t: fn(FakeLM(t), b, None, c), has_aux=True))(
        jnp.asarray(table))
    return loss, metrics, np.asarray(grad)

  full_loss, full_metrics, full_grad = run(batch)
  counts = losses.global_counts(losses.get("grpo"), batch, c)
  parts = [run({**{k: v[s] for k, v in batch.items()}, **counts})
           for s in (slice(0, 1), slice(1, B))]
  np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(full_loss), rtol=1e-5)
  np.testing.assert_allclose(sum(p[2] for p in parts), full_grad, rtol=1e-4, atol=1e-8)
  for key, value in full_metrics.items():
    np.testing.assert_allclose(sum(float(p[1][key]) for p in parts), float(value), rtol=1e-5, atol=1e-8,
                               err_msg=key)


@pytest.mark.parametrize("micro", (1, 2))
def test_train_step_seq_mean_metrics_average_rows_with_tokens(micro):
  """Through the trainer (global counts in every micro-batch): the masked row 3 does not dilute the metrics."""
  table, batch = make_batch(1)
  mode = "seq_mean_token_mean"
  c = cfg(aggregation=mode, beta=0.04, epsilon_high=0.28)
  tx, lr = optim.make(opt_cfg(), 10)
  graphdef, state = state_lib.init(FakeLM(table), tx, sharding.make_mesh({}, jax.devices()[:1]), seed=0)
  _, metrics = jax.jit(make_train_step(graphdef, StepOptions(losses.get("grpo"), c, tx, lr, micro)))(state, batch)
  _, _, want = np_reference(table, batch, mode, 0.04, 0.2, 0.28)
  assert batch["loss_mask"][3].sum() == 0 and want["entropy"] > 0
  for key, value in want.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_rl_overrides_on_the_command_line_reach_the_loss_and_batch():
  """One source of truth: `--config.rl.temperature` alone sets the temperature the loss's ratio uses."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  program = ("import json, sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
             "config = config_flags.DEFINE_config_file('config', None, lock_config=True)\nflags.FLAGS(sys.argv)\n"
             "c = config.value\nprint(json.dumps([c.loss.temperature, c.loss.max_completion_len, "
             "c.train.global_batch_size, c.rl.prompts_per_step]))")
  out = subprocess.run([sys.executable, "-c", program, "--config=configs/grpo.py:tiny", "--config.rl.temperature=0.7",
                        "--config.rl.max_completion_len=16", "--config.rl.num_generations=2"],
                       cwd=root, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  temperature, max_len, batch, prompts = json.loads(out.stdout.strip().splitlines()[-1])
  assert (temperature, max_len, batch) == (0.7, 16, 2 * prompts)
