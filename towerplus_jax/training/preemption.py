"""Stopping a run early and cleanly: SIGTERM/SIGINT (and TPU preemption notices) become a flag the loop polls, so it
saves a checkpoint and exits with `Stopped` (exit status 128 + signal) for a launcher to rerun and resume."""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the training loop polls, so it can save a checkpoint before exiting."""

  def __init__(self):
    self.event = threading.Event()
    self.signum = signal.SIGTERM  # the signal seen (a stop agreed with other hosts counts as SIGTERM)
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    self.signum = signum
    self.event.set()

  @property
  def requested(self) -> bool:
    return self.event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, step: int, every: int) -> bool:
    """Whether every host stops after `step`. TPU preemption notices arrive through jax's sync point (every step);
    a signal seen by some hosts only is shared on every `every`-th step (a collective)."""
    if jax.process_count() == 1:
      return self.requested
    if multihost_utils.reached_preemption_sync_point(step):
      return True
    return step % every == 0 and bool(multihost_utils.process_allgather(np.asarray(self.requested)).any())


class Stopped(Exception):
  """Training stopped on a signal at `step` of `total`, after saving a checkpoint there; rerun to resume. The exit
  status is 128 + the signal number (143 for SIGTERM), so launchers that retry on failure resume the run."""

  def __init__(self, step: int, total: int, signum: int):
    super().__init__(f"stopped at step {step} of {total} ({signal.Signals(signum).name}); a checkpoint was saved: "
                     "rerun the same command to resume")
    self.step, self.total, self.exit_code = step, total, 128 + signum
