"""DPO / WPO loss and metrics vs numpy closed forms; WPO weight without gradient; reference_fn; micro-batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_lm import FakeLM, np_log_softmax
from towerplus_jax import losses

P, TC, TR, V = 3, 5, 4, 7  # pairs, chosen length, rejected length (shorter: padded inside the loss), vocab


def make_batch(seed=0):
  """Pair 0: the policy is confident in both responses (WPO weight clamped at 1); pairs 1, 2: weight < 1."""
  rng = np.random.default_rng(seed)
  n_c, n_r = P * TC, P * TR
  table = rng.normal(size=(1 + n_c + n_r, V)) * 2
  batch = {}
  for side, t, first in (("chosen", TC, 1), ("rejected", TR, 1 + n_c)):
    ids = first + np.arange(P * t, dtype=np.int32).reshape(P, t)
    targets = rng.integers(0, V, (P, t)).astype(np.int32)
    mask = np.zeros((P, t), np.float32)
    mask[:, 2:] = 1.0  # two prompt tokens
    mask[1, -1] = 0.0  # a padded position
    table[ids[0], targets[0]] += 12.0  # confident pair 0
    batch.update({f"{side}_inputs": ids, f"{side}_targets": targets, f"{side}_loss_mask": mask,
                  f"{side}_positions": np.tile(np.arange(t, dtype=np.int32), (P, 1)),
                  f"{side}_segment_ids": np.ones((P, t), np.int32)})
  batch["ref_chosen_logp"] = rng.normal(size=P).astype(np.float32) * 2 - 4
  batch["ref_rejected_logp"] = rng.normal(size=P).astype(np.float32) * 2 - 4
  return table, batch


def np_side(table, batch, side):
  """Summed log-probs and WPO ā per pair for one side."""
  logp_all = np_log_softmax(table[batch[f"{side}_inputs"]])
  logp = np.take_along_axis(logp_all, batch[f"{side}_targets"][..., None], -1)[..., 0]
  m = batch[f"{side}_loss_mask"]
  a = logp - np.log((np.exp(logp_all) ** 2).sum(-1))
  return (logp * m).sum(-1), (a * m).sum(-1) / m.sum(-1)


def np_reference(table, batch, beta, eps, weighting):
  pi_w, a_w = np_side(table, batch, "chosen")
  pi_l, a_l = np_side(table, batch, "rejected")
  r_w, r_l = beta * (pi_w - batch["ref_chosen_logp"]), beta * (pi_l - batch["ref_rejected_logp"])
  logsig = lambda x: -np.log1p(np.exp(-x))
  dpo = -(1 - eps) * logsig(r_w - r_l) - eps * logsig(r_l - r_w)
  w = np.minimum(np.exp(a_w + a_l), 1.0) if weighting else np.ones(P)
  return w, dpo, {
      "loss": (w * dpo).mean(), "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
      "rewards/accuracies": (r_w > r_l).mean(), "rewards/margins": (r_w - r_l).mean(),
      "logps/chosen": pi_w.mean(), "logps/rejected": pi_l.mean(), "wpo/weight": w.mean()}


def cfg(name, **kw):
  c = losses.default_config(name)
  c.update(kw)
  return c


@pytest.mark.parametrize("name,beta,eps", [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("wpo", 0.01, 0.0),
                                           ("wpo", 0.3, 0.1)])
def test_loss_and_metrics_match_numpy(name, beta, eps):
  table, batch = make_batch()
  loss, metrics = losses.get(name).fn(FakeLM(table), batch, jax.random.key(0),
                                      cfg(name, beta=beta, label_smoothing=eps))
  w, _, want = np_reference(table, batch, beta, eps, name == "wpo")
  if name == "wpo":
    assert w[0] == 1.0 and np.all((w[1:] > 0) & (w[1:] < 1))  # both regimes of the clamp are exercised
  np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)
  assert set(metrics) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_default_betas():
  assert losses.default_config("dpo").beta == 0.1 and losses.default_config("wpo").beta == 0.01
  assert losses.default_config("wpo").wpo_weighting and not losses.default_config("dpo").wpo_weighting


def test_wpo_weight_gets_no_gradient():
  """grad L_WPO == Σ_i w_i(const) · grad L_DPO(pair i): the weight is a constant to the optimiser."""
  table, batch = make_batch()
  c_wpo, c_dpo = cfg("wpo", beta=0.3, label_smoothing=0.1), cfg("dpo", beta=0.3, label_smoothing=0.1)
  w, _, _ = np_reference(table, batch, 0.3, 0.1, True)
  grad = lambda name, b, c: np.asarray(jax.grad(lambda t: losses.get(name).fn(FakeLM(t), b, None, c)[0])(
      jnp.asarray(table)))
  got = grad("wpo", batch, c_wpo)
  want = sum(w[i] * grad("dpo", {**{k: v[i:i + 1] for k, v in batch.items()}, "loss_denominator": P}, c_dpo)
             for i in range(P))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)


def test_reference_fn_sums_reference_logprobs():
  table, batch = make_batch()
  ref_table = np.random.default_rng(5).normal(size=table.shape)
  got = losses.get("wpo").reference_fn(FakeLM(ref_table), batch, cfg("wpo"))
  assert set(got) == set(losses.get("wpo").reference_keys) and losses.get("dpo").needs_reference(None)
  for side in ("chosen", "rejected"):
    np.testing.assert_allclose(np.asarray(got[f"ref_{side}_logp"]), np_side(ref_table, batch, side)[0], rtol=1e-5)
  no_ref = {k: v for k, v in batch.items() if not k.startswith("ref_")}
  with pytest.raises(KeyError, match="ref_chosen_logp"):
    losses.get("dpo").fn(FakeLM(table), no_ref, None, cfg("dpo"))


def test_padding_pairs_do_not_count():
  table, batch = make_batch()
  padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}
  assert float(losses.loss_denominator("wpo", padded, None)) == P
  c = cfg("wpo", beta=0.3)
  full = losses.get("wpo").fn(FakeLM(table), batch, None, c)
  with_pad = losses.get("wpo").fn(FakeLM(table), padded, None, c)
  for key in full[1]:
    np.testing.assert_allclose(float(with_pad[1][key]), float(full[1][key]), rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["dpo", "wpo"])
def test_micro_batches_with_global_denominator_equal_full_batch(name):
  table, batch = make_batch(1)
  c = cfg(name, beta=0.2, label_smoothing=0.1)
  fn = losses.get(name).fn

  def run(b):
    (loss, metrics), grad = jax.jit(jax.value_and_grad(lambda t: fn(FakeLM(t), b, None, c), has_aux=True))(
        jnp.asarray(table))
    return loss, metrics, np.asarray(grad)

  full_loss, full_metrics, full_grad = run(batch)
  denom = losses.loss_denominator(name, batch, c)
  parts = [run({**{k: v[s] for k, v in batch.items()}, "loss_denominator": denom})
           for s in (slice(0, 1), slice(1, P))]
  np.testing.assert_allclose(sum(float(p[0]) for p in parts), float(full_loss), rtol=1e-5)
  np.testing.assert_allclose(sum(p[2] for p in parts), full_grad, rtol=1e-4, atol=1e-8)
  for key, value in full_metrics.items():
    np.testing.assert_allclose(sum(float(p[1][key]) for p in parts), float(value), rtol=1e-5, err_msg=key)
