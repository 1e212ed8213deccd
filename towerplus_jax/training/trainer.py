"""The one training loop of every stage (CPT, SFT, WPO/DPO, GRPO): restore, step, log, eval, save, stop.

The loop knows losses only through its `StepOptions` and batches only through a `BatchSource`; GRPO's rollouts are
a batch source like a dataset, handed the current policy at each call.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.data.pipeline import DataCounts
from towerplus_jax.files import checkpoint
from towerplus_jax.training import step as step_lib
from towerplus_jax.training.metrics_writer import MetricsWriter
from towerplus_jax.training.preemption import Stopped, StopSignal
from towerplus_jax.training.state import TrainState


class BatchSource(Protocol):
  """Global batches (dicts of numpy arrays, the same on every host) whose position a checkpoint saves."""

  def next(self, policy: Callable[[], nnx.Module]) -> dict:
    """The next batch; `policy()` is the current policy, for sources that generate with it (rollouts)."""

  def host_metrics(self) -> dict[str, float]: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """The `train` section as the loop reads it."""
  steps: int
  log_every: int
  eval_every: int  # 0 = only at the end
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoint: bool
  max_nonfinite: int

  @classmethod
  def of(cls, train: ml_collections.ConfigDict) -> LoopOptions:
    return cls(**{f.name: train[f.name] for f in dataclasses.fields(cls)})


def _floats(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _batch_tokens(batch: dict) -> int:
  return int(sum(np.size(v) for k, v in batch.items() if k.endswith("inputs")))


def check_finite(metrics: dict, max_nonfinite: int, step: int) -> None:
  """Stop the run once `max_nonfinite` updates in a row were skipped as non-finite (optim.apply_if_finite)."""
  consecutive = int(metrics["nonfinite/consecutive"])
  if consecutive >= max_nonfinite:
    raise FloatingPointError(
        f"step {step}: {consecutive} consecutive updates had non-finite gradients or loss (skipped); stopping "
        f"(train.max_nonfinite={max_nonfinite}). Lower optimizer.lr, check the data, or resume from the last "
        "checkpoint.")


class Trainer:
  """Runs (or resumes) one stage in its workdir: `run()` returns the last logged metrics, or raises `Stopped` when a
  signal stopped it early (after saving a checkpoint)."""

  def __init__(self, *, graphdef: nnx.GraphDef, state: TrainState, step_options: step_lib.StepOptions, mesh: Mesh,
               batches: BatchSource, eval_batches: Callable[[], Iterable[dict]] | None, options: LoopOptions,
               workdir: str, flops_per_token: float, on_restored: Callable[[], None] = lambda: None):
    """`on_restored` runs once the run is known to be valid (its checkpoint restored, or a new run): it writes the
    run's own files into `workdir` (see run/stage.py)."""
    self.graphdef, self.state, self.mesh, self.options = graphdef, state, mesh, options
    self.batches, self.eval_batches, self.on_restored = batches, eval_batches, on_restored
    self.workdir, self.flops_per_token = workdir, flops_per_token
    self.loss = step_options.loss
    shardings = jax.tree.map(lambda x: x.sharding, state)
    self.train_step = step_lib.jit_train_step(graphdef, step_options, shardings)
    self.eval_step = jax.jit(step_lib.make_eval_step(graphdef, step_options))
    self.ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=options.keep_checkpoints,
                                       save_every=options.checkpoint_every, async_save=options.async_checkpoint)
    self.counts = DataCounts()

  def policy(self) -> nnx.Module:
    return self.state.model(self.graphdef)

  def restore(self) -> int:
    """The step to start from: the newest readable checkpoint's (state and batch source restored), else 0."""
    shardings = jax.tree.map(lambda x: x.sharding, self.state)
    params, train = self.state.checkpoint_items()
    params_sh, train_sh = shardings.checkpoint_items()
    found = self.ckpt.restore_latest(checkpoint.abstract_like(params, params_sh),
                                     checkpoint.abstract_like(train, train_sh), data=True)
    if found is None:
      return 0
    start, out = found
    self.batches.set_state(out["data"])
    self.state = self.state.with_checkpoint(out["params"], out["train"])
    logging.info("resumed from %s at step %d", self.ckpt.manager.directory, start)
    return start

  def step(self, index: int, start: int) -> dict:
    """One optimizer step on the next batch; its metrics stay on device (read when logged)."""
    batch = self.batches.next(self.policy)
    if index == start:  # a batch off its format: one error naming the field, not one from inside jit
      self.loss.batch_format.check(batch)
    batch = self.counts.take(batch)
    self.writer.count_tokens(_batch_tokens(batch))
    with jax.set_mesh(self.mesh):
      self.state, metrics = self.train_step(self.state, sharding.shard_global_batch(batch, self.mesh))
    return metrics

  def log(self, step: int, metrics: dict) -> dict[str, float]:
    logged = self.writer.progress(step, {**_floats(metrics), **self.batches.host_metrics(), **self.counts.metrics()})
    self.writer.write(step, logged)
    return logged

  def evaluate(self) -> dict[str, float]:
    """Metrics over the eval batches (global batches, so every host runs the same count), each batch weighted by its
    loss denominator (loss tokens or rows): the token/row mean over the whole eval set."""
    totals: dict[str, float] = {}
    weight = 0.0
    for batch in self.eval_batches():
      with jax.set_mesh(self.mesh):
        metrics = _floats(self.eval_step(self.state, sharding.shard_global_batch(batch, self.mesh)))
      w = metrics.pop("weight")
      totals = {k: totals.get(k, 0.0) + w * v for k, v in metrics.items()}
      weight += w
    return {k: v / max(weight, 1.0) for k, v in totals.items()}

  def save(self, step: int, force: bool = False) -> None:
    """A checkpoint at `step` (every `checkpoint_every` steps, or `force`d)."""
    self.ckpt.save(step, *self.state.checkpoint_items(), self.batches.get_state(), force=force)

  def run(self) -> dict[str, float]:
    start = self.restore()
    self.on_restored()  # only now: a resume refused above (a checkpoint that does not restore) has changed nothing
    self.writer = MetricsWriter(self.workdir, self.options.steps, self.flops_per_token, resume_step=start)
    stop = StopSignal()
    try:
      return self._loop(start, stop)
    finally:
      self.ckpt.close()
      self.writer.close()
      stop.restore_handlers()

  def _loop(self, start: int, stop: StopSignal) -> dict[str, float]:
    opts, last, pending, stopped = self.options, {}, None, False
    final = opts.steps
    for i in range(start, opts.steps):
      metrics = self.step(i, start)
      if pending is not None:  # the previous step's: checking it now keeps the device busy
        check_finite(pending, opts.max_nonfinite, i)
      pending = metrics
      if (i + 1) % opts.log_every == 0 or i + 1 == opts.steps:
        last = self.log(i + 1, metrics)
      if opts.eval_every and (i + 1) % opts.eval_every == 0 and self.eval_batches is not None:
        self.writer.write(i + 1, self.evaluate(), prefix="eval/")
      self.save(i + 1)
      if stop.agreed(i + 1, opts.log_every):
        logging.warning("stop requested: saving a checkpoint at step %d and exiting", i + 1)
        final, stopped = i + 1, True
        break
    if pending is not None:
      check_finite(pending, opts.max_nonfinite, final)
    if self.ckpt.latest_step() != final:
      self.save(final, force=True)
    if stopped:
      raise Stopped(final, opts.steps, stop.signum)
    if self.eval_batches is not None:
      final_eval = {f"eval/{k}": v for k, v in self.evaluate().items()}
      if not (opts.eval_every and final % opts.eval_every == 0):  # else the loop wrote this step's eval already
        self.writer.write(final, final_eval)
      last = {**last, **final_eval}
    return last

