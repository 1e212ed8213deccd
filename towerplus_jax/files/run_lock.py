"""One trainer per workdir: an exclusive lock on `WORKDIR/.lock`, held for the whole run.

The operating system drops the lock when the process ends, however it ends (kill -9 included), so a crashed run never
leaves a stale lock. Only process 0 of a multi-host run takes it; cloud paths (gs://...) are not locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator

import jax

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Hold the workdir's lock; raise one clear line naming the holder when another run has it."""
  if "://" in workdir or jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_NAME), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirBusy(f"workdir {workdir} is in use by another run ({holder}); stop it or choose another "
                         "--workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
