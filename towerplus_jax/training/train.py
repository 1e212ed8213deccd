"""The one training loop used by every stage (CPT, SFT, WPO/DPO, GRPO).

The loop knows losses only through the registry (`towerplus_jax.losses.get(config.loss.name)`) and batches only as
dicts of arrays; GRPO's batches come from the rollout source instead of a dataset, nothing else differs.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import losses, sharding
from towerplus_jax.files import checkpoint
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.training import optim
from towerplus_jax.training.metrics_writer import MetricsWriter

State = dict[str, Any]  # {"params": nnx.State, "opt_state": optax state, "step": int32[], "rng": uint32[2]}


@dataclasses.dataclass
class StepFns:
  train: Callable[[State, Any, dict], tuple[State, dict]]
  eval: Callable[[Any, dict], dict]


def _micro_split(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [m, B/m, ...], micro-batch i taking rows i, i+m, ... (each device contributes to every micro-batch)."""
  if x.ndim == 0:
    return jnp.broadcast_to(x, (m,))
  if x.shape[0] % m:
    raise ValueError(f"batch of {x.shape[0]} rows is not divisible into train.micro_batches={m}")
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def make_step_fns(graphdef: nnx.GraphDef, loss: losses.Loss, loss_cfg: ml_collections.ConfigDict,
                  tx: optax.GradientTransformation, lr: optax.Schedule, micro_batches: int,
                  use_reference: bool) -> StepFns:
  """Pure (jittable) train and eval steps."""

  def add_reference(ref_params, batch):
    if use_reference and not all(k in batch for k in loss.reference_keys):
      extra = loss.reference_fn(nnx.merge(graphdef, ref_params), batch, loss_cfg)
      batch = {**batch, **jax.tree.map(jax.lax.stop_gradient, extra)}
    return batch

  def micro_step(params, ref_params, batch, rng):
    batch = add_reference(ref_params, batch)
    def f(p):
      return loss.fn(nnx.merge(graphdef, p), batch, rng, loss_cfg)
    (value, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, {"loss": value, **metrics, "objective": value}

  def train_step(state: State, ref_params, batch: dict) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    batch = {**batch, **losses.global_counts(loss, batch, loss_cfg)}
    params = state["params"]
    if micro_batches == 1:
      grads, metrics = micro_step(params, ref_params, batch, rng)
    else:
      micro = jax.tree.map(lambda x: _micro_split(x, micro_batches), batch)

      def body(carry, xs):
        mb, i = xs
        g, m = micro_step(params, ref_params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zero_metrics = jax.eval_shape(lambda: micro_step(params, ref_params, jax.tree.map(lambda x: x[0], micro),
                                                       rng)[1])
      init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                                 zero_metrics))
      (grads, metrics), _ = jax.lax.scan(body, init, (micro, jnp.arange(micro_batches)))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    consecutive, total = optim.nonfinite_counts(opt_state)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": lr(state["step"]),
               "nonfinite/consecutive": consecutive, "nonfinite/total": total}
    return new_state, metrics

  def eval_step(params, ref_params, batch: dict) -> dict:
    batch = add_reference(ref_params, {**batch, **losses.global_counts(loss, batch, loss_cfg)})
    value, metrics = loss.fn(nnx.merge(graphdef, params), batch, jax.random.key(0), loss_cfg)
    return {"loss": value, **metrics, "objective": value, "weight": batch["loss_denominator"]}

  return StepFns(train_step, eval_step)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6·(non-embedding params + lm head) + attention scores (12·L·T·N·H), as MaxText."""
  d, f, n, k, h, layers = (cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.num_layers)
  per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
  return 6 * (layers * per_layer + d * cfg.vocab_size) + 12 * layers * seq_len * n * h


def _batch_tokens(batch: dict) -> int:
  return int(sum(np.size(v) for k, v in batch.items() if k.endswith("inputs")))


def _floats(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Run (or resume) one stage in `workdir`; returns the last logged metrics. Raises `checkpoint.Stopped` when a
  signal stopped it early (after saving a checkpoint)."""
  from towerplus_jax.data.pipeline import DataCounts  # data/tokenizer stack: only needed for a real run
  from towerplus_jax.run.setup_run import setup_run
  run = setup_run(config, workdir)
  loss = losses.get(config.loss.name)
  tcfg = config.train
  tx, lr = optim.make(config.optimizer, tcfg.steps)
  graphdef, params = nnx.split(run.model)
  params_sh = sharding.state_shardings(params, run.mesh)
  replicated = NamedSharding(run.mesh, P())
  with jax.set_mesh(run.mesh):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings(tx, params, params_sh, replicated))(params)
  state = {"params": params, "opt_state": opt_state,
           "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
           "rng": jax.device_put(jax.random.key_data(jax.random.key(tcfg.seed)), replicated)}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  fns = make_step_fns(graphdef, loss, config.loss, tx, lr, tcfg.micro_batches, run.ref_params is not None)
  train_step = jax.jit(fns.train, in_shardings=(state_sh, None, None), out_shardings=(state_sh, None),
                       donate_argnums=0)
  eval_step = jax.jit(fns.eval)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=tcfg.keep_checkpoints,
                                 save_every=tcfg.checkpoint_every, async_save=tcfg.async_checkpoint)
  batches = run.batches(lambda: nnx.merge(graphdef, state["params"]))
  start, state = _restore(ckpt, state, batches)
  run.save_files()  # only now: a resume refused above (a checkpoint that does not restore) has changed nothing
  if start:
    logging.info("resumed from %s at step %d", ckpt.manager.directory, start)
  writer = MetricsWriter(workdir, tcfg.steps, flops_per_token(run.model_cfg, config.data.seq_len), resume_step=start)
  stop = checkpoint.StopSignal()
  counts = DataCounts()
  last: dict[str, float] = {}
  pending = None
  step = start
  stopped = False
  try:
    for step in range(start, tcfg.steps):
      batch = next(batches)
      if step == start:  # a batch off its format: one error naming the field, not one from inside jit
        loss.batch_format.check(batch)
      batch = counts.take(batch)
      writer.count_tokens(_batch_tokens(batch))
      with jax.set_mesh(run.mesh):
        state, metrics = train_step(state, run.ref_params, sharding.shard_global_batch(batch, run.mesh))
      if pending is not None:
        _check_finite(pending, tcfg.max_nonfinite, step)
      pending = metrics
      if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
        last = writer.progress(step + 1, {**_floats(metrics), **batches.host_metrics(), **counts.metrics()})
        writer.write(step + 1, last)
      if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and run.eval_batches is not None:
        writer.write(step + 1, _evaluate(eval_step, state["params"], run), prefix="eval/")
      ckpt.save(step + 1, nnx.to_pure_dict(state["params"]), _train_item(state), batches.get_state())
      if _stop_requested(stop, step + 1, tcfg.log_every):
        logging.warning("stop requested: saving a checkpoint at step %d and exiting", step + 1)
        stopped = True
        break
    else:
      step = tcfg.steps - 1
    if pending is not None:
      _check_finite(pending, tcfg.max_nonfinite, step + 1)
    final = step + 1
    if ckpt.latest_step() != final:
      ckpt.save(final, nnx.to_pure_dict(state["params"]), _train_item(state), batches.get_state(), force=True)
    if stopped:
      raise checkpoint.Stopped(final, tcfg.steps, stop.signum)
    if run.eval_batches is not None:
      final_eval = {f"eval/{k}": v for k, v in _evaluate(eval_step, state["params"], run).items()}
      if not (tcfg.eval_every and final % tcfg.eval_every == 0):  # else the loop wrote this step's eval already
        writer.write(final, final_eval)
      last = {**last, **final_eval}
  finally:
    ckpt.close()
    writer.close()
    stop.restore_handlers()
  return last


def opt_shardings(tx, params, params_sh, replicated):
  """Optimizer-state leaves that mirror a parameter get its sharding; the rest (counts, scalars) are replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, params_sh,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def _train_item(state: State) -> dict:
  return {"opt_state": state["opt_state"], "step": state["step"], "rng": state["rng"]}


def _restore(ckpt: checkpoint.Checkpointer, state: State, batches) -> tuple[int, State]:
  """(step, state) of the newest readable checkpoint, or (0, `state`) for a new run."""
  shardings = jax.tree.map(lambda x: x.sharding, state)
  abstract_params = checkpoint.abstract_like(nnx.to_pure_dict(state["params"]),
                                             nnx.to_pure_dict(shardings["params"]))
  train_item = _train_item(state)
  abstract_train = checkpoint.abstract_like(train_item, _train_item(shardings))
  found = ckpt.restore_latest(abstract_params, abstract_train, data=True)
  if found is None:
    return 0, state
  step, out = found
  batches.set_state(out["data"])
  params = state["params"]
  nnx.replace_by_pure_dict(params, out["params"])
  return step, {"params": params, **out["train"]}


def _evaluate(eval_step, params, run) -> dict[str, float]:
  """Metrics over the eval batches (global batches, so every host runs the same count), each batch weighted by its
  loss denominator (loss tokens or rows): the token/row mean over the whole eval set."""
  totals: dict[str, float] = {}
  weight = 0.0
  for batch in run.eval_batches():
    with jax.set_mesh(run.mesh):
      metrics = _floats(eval_step(params, run.ref_params, sharding.shard_global_batch(batch, run.mesh)))
    w = metrics.pop("weight")
    totals = {k: totals.get(k, 0.0) + w * v for k, v in metrics.items()}
    weight += w
  return {k: v / max(weight, 1.0) for k, v in totals.items()}


def _check_finite(metrics: dict, max_nonfinite: int, step: int) -> None:
  consecutive = int(metrics["nonfinite/consecutive"])
  if consecutive >= max_nonfinite:
    raise FloatingPointError(
        f"step {step}: {consecutive} consecutive updates had non-finite gradients or loss (skipped); stopping "
        f"(train.max_nonfinite={max_nonfinite}). Lower optimizer.lr, check the data, or resume from the last "
        "checkpoint.")


def _stop_requested(stop: checkpoint.StopSignal, step: int, every: int) -> bool:
  """Multi-host: every host must agree. TPU preemption notices arrive through jax's sync point (every step);
  a signal seen by some hosts only is shared on log steps."""
  if jax.process_count() == 1:
    return stop.requested
  if multihost_utils.reached_preemption_sync_point(step):
    return True
  return step % every == 0 and bool(multihost_utils.process_allgather(np.asarray(stop.requested)).any())
