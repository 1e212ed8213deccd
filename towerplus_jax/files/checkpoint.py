"""Orbax checkpoints of a training run: params, optimizer state + step + RNG, and the batch source's state.

Layout: `<dir>/<step>/{params,train,data}`. `params` alone is a complete model checkpoint (what the HF importer and
`init_from` read); `train` holds {"opt_state", "step", "rng"}; `data` the batch source's state as JSON (the grain
iterator state of the global stream, plus GRPO's rollout counter), written once by process 0 and the same for any
host count, so a run resumes on another number of hosts. Saves are async and atomic (Orbax writes to a temporary
folder and renames), so a checkpoint is never half-written: a save that fails (e.g. a full disk) raises `SaveFailed`
naming the step and the step a rerun resumes from, and its temporary folder is removed when the run restarts.
"""
from __future__ import annotations

import errno
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class Checkpointer:
  """Keep-N async CheckpointManager over the three items of a run."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 0, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           save_interval_steps=max(save_every, 1), create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(epath.Path(directory), options=options,
                                         item_names=("params", "train", "data"))
    self.save_every = save_every
    self.saving: int | None = None  # the step of the async save in flight
    self.failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, train: Any, data_state: dict | None = None, *, force: bool = False) -> bool:
    if not force and not (self.save_every and step % self.save_every == 0):
      return False
    items = {"params": ocp.args.StandardSave(params), "train": ocp.args.StandardSave(train)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.wait()  # an error of the save in flight is that save's
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      raise self._save_failed(step, e) from e
    self.saving = step if saved else None
    return saved

  def _save_failed(self, step: int, error: Exception) -> SaveFailed:
    self.failed = True
    self.manager.reload()  # the steps committed on disk (a failed save's temporary folder is not one)
    return SaveFailed(step, str(self.manager.directory), self.manager.latest_step(), error)

  def restore(self, step: int, abstract_params: Any, abstract_train: Any = None, data: bool = False) -> dict:
    """Restore onto the shardings of the abstract trees (jax.ShapeDtypeStruct with .sharding): any mesh works.
    `data`: also return the saved batch-source state (out["data"])."""
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_train is not None:
      items["train"] = ocp.args.StandardRestore(abstract_train)
    if data:
      items["data"] = ocp.args.JsonRestore()
    return dict(self.manager.restore(step, args=ocp.args.Composite(**items)))

  def restore_latest(self, abstract_params: Any, abstract_train: Any = None, data: bool = False
                     ) -> tuple[int, dict] | None:
    """(step, items) of the newest readable checkpoint, None when there is none.

    A step that fails to restore while an older one restores (a truncated or deleted file in the newest save) is
    set aside as `<step>.unreadable`, with a warning; when no step restores (e.g. the model changed) nothing is
    renamed and the first error is raised, naming the folder."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
      out, reason = None, ""
      try:
        out = self.restore(step, abstract_params, abstract_train, data)
      except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many types for a damaged file)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      if not _all_processes(out is not None):  # hosts agree on the step, or all move on
        failed.append((step, reason or "unreadable on another host"))
        continue
      if failed:
        self._set_aside(failed, step)
      return step, out
    if failed:
      raise ValueError(f"{self.manager.directory}: no checkpoint restores (steps {steps}); step {failed[0][0]}: "
                       f"{failed[0][1]}")
    return None

  def _set_aside(self, failed: list[tuple[int, str]], restored: int) -> None:
    for step, reason in failed:
      logging.warning("checkpoint step %d in %s is unreadable (%s): set aside as %d.unreadable, resuming from step "
                      "%d", step, self.manager.directory, reason, step, restored)
      if jax.process_index() == 0:
        folder = epath.Path(self.manager.directory) / str(step)
        folder.rename(folder.parent / f"{step}.unreadable")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("unreadable checkpoints set aside")
    self.manager.reload()

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self.saving, e) from e
    finally:
      self.saving = None

  def close(self) -> None:
    """Wait for the save in flight (raising `SaveFailed` if it fails) and close; after a reported failure, only
    close."""
    try:
      if not self.failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001  (the failure was reported already)
        if not self.failed:
          raise


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Params of the latest (or given) step of a run's checkpoint folder, onto the abstract tree's shardings."""
  manager = ocp.CheckpointManager(epath.Path(directory), item_names=("params", "train", "data"),
                                  options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
  manager.close()
  return out["params"]


def save_params(directory: str, params: Any, step: int = 0) -> None:
  """A params-only checkpoint in the run layout (used by the HF importer)."""
  manager = ocp.CheckpointManager(epath.Path(directory), item_names=("params", "train", "data"),
                                  options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
  manager.wait_until_finished()
  manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying the given shardings (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective in multi-host runs)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


class SaveFailed(Exception):
  """Saving checkpoint `step` failed (e.g. a full disk); the checkpoints already committed are intact and a rerun
  resumes from the newest (`resume_step`)."""

  def __init__(self, step: int, directory: str, resume_step: int | None, error: Exception):
    cause = error
    while cause.__cause__ is not None and not isinstance(cause, OSError):
      cause = cause.__cause__
    if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(cause):
      what, fix = "no space left on device", "free space"
    else:
      what, fix = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}", "fix that"
    resume = f"resume from step {resume_step}" if resume_step is not None else "start over (no checkpoint yet)"
    super().__init__(f"{what} while saving checkpoint step {step} to {directory}; {fix} and rerun to {resume}")
    self.step, self.resume_step = step, resume_step
