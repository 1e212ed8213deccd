"""The pure train and eval steps of every stage: a registered loss (`towerplus_jax.losses`) on a `TrainState`.

The step knows losses only through the registry's `Loss` (its fn, batch format, reference keys); nothing here is
stage-specific. Gradients are taken with respect to `state.params` only (the trainable parameters).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from towerplus_jax import losses
from towerplus_jax.training import optim
from towerplus_jax.training.state import TrainState, policy

TrainStep = Callable[[TrainState, dict], tuple[TrainState, dict]]
EvalStep = Callable[[TrainState, dict], dict]


@dataclasses.dataclass(frozen=True)
class StepOptions:
  loss: losses.Loss
  loss_cfg: ml_collections.ConfigDict  # the stage's `loss` section, as the loss reads it
  tx: optax.GradientTransformation
  lr: optax.Schedule
  micro_batches: int = 1  # gradient accumulation: the batch is split into this many sequential passes


def _micro_split(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [m, B/m, ...], micro-batch i taking rows i, i+m, ... (each device contributes to every micro-batch)."""
  if x.ndim == 0:
    return jnp.broadcast_to(x, (m,))
  if x.shape[0] % m:
    raise ValueError(f"batch of {x.shape[0]} rows is not divisible into train.micro_batches={m}")
  return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _with_reference(graphdef: nnx.GraphDef, opts: StepOptions, state: TrainState, batch: dict) -> dict:
  """The batch with the reference model's log-probs the loss needs, unless the data carries them (precomputed)."""
  loss = opts.loss
  if state.reference is None or all(k in batch for k in loss.reference_keys):
    return batch
  extra = loss.reference_fn(state.reference_model(graphdef), batch, opts.loss_cfg)
  return {**batch, **jax.tree.map(jax.lax.stop_gradient, extra)}


def _grads(graphdef: nnx.GraphDef, opts: StepOptions, state: TrainState, batch: dict, rng: jax.Array):
  batch = _with_reference(graphdef, opts, state, batch)

  def objective(params):
    return opts.loss.fn(policy(graphdef, params, state.frozen), batch, rng, opts.loss_cfg)
  (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  return grads, {"loss": value, **metrics, "objective": value}


def make_train_step(graphdef: nnx.GraphDef, opts: StepOptions) -> TrainStep:
  """`(state, global batch) -> (next state, metrics)`: gradients (accumulated over micro-batches), one optimizer
  update (skipped when non-finite, see optim.apply_if_finite), the step counter advanced."""

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = {**batch, **losses.global_counts(opts.loss, batch, opts.loss_cfg)}
    m = opts.micro_batches
    if m == 1:
      grads, metrics = _grads(graphdef, opts, state, batch, rng)
    else:
      micro = jax.tree.map(lambda x: _micro_split(x, m), batch)

      def body(carry, xs):
        mb, i = xs
        return jax.tree.map(jnp.add, carry, _grads(graphdef, opts, state, mb, jax.random.fold_in(rng, i))), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(lambda: _grads(graphdef, opts, state, first, rng)))
      (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
    updates, opt_state = opts.tx.update(grads, state.opt_state, state.params)
    consecutive, total = optim.nonfinite_counts(opt_state)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": opts.lr(state.step),
               "nonfinite/consecutive": consecutive, "nonfinite/total": total}
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         step=state.step + 1), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, opts: StepOptions) -> EvalStep:
  """`(state, global batch) -> metrics` of the loss (no update), with the batch's loss denominator as `weight`."""

  def eval_step(state: TrainState, batch: dict) -> dict:
    batch = {**batch, **losses.global_counts(opts.loss, batch, opts.loss_cfg)}
    batch = _with_reference(graphdef, opts, state, batch)
    value, metrics = opts.loss.fn(state.model(graphdef), batch, jax.random.key(0), opts.loss_cfg)
    return {"loss": value, **metrics, "objective": value, "weight": batch["loss_denominator"]}

  return eval_step


def jit_train_step(graphdef: nnx.GraphDef, opts: StepOptions, shardings: TrainState):
  """The train step as training and the TPU compiler run it: the state donated, its shardings kept."""
  return jax.jit(make_train_step(graphdef, opts), in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=0)
