"""Multi-host start-up: `jax.distributed.initialize()` when this process is one of several hosts.

Call `initialize()` before anything touches a JAX device. It decides from the environment whether the run spans
several processes (TPU pod slice, multislice, SLURM, Open MPI, an explicit coordinator, or
`TOWERPLUS_DISTRIBUTED=1`, which `launch/tpu_run.sh` sets); `TOWERPLUS_DISTRIBUTED=0` forces a single-host run.

Timeouts (seconds, environment): `TOWERPLUS_INIT_TIMEOUT` (default 300) for all processes to reach the
coordinator, `TOWERPLUS_HEARTBEAT_TIMEOUT` (default 60) after which a silent (dead) process makes the coordinator
stop the others, which then exit non-zero instead of hanging in a collective.
"""
from __future__ import annotations

import functools
import glob
import os
import pathlib
import sys
import threading
import urllib.request
from collections.abc import Mapping

import jax
from absl import logging

ENV_FLAG = "TOWERPLUS_DISTRIBUTED"
INIT_TIMEOUT_ENV, INIT_TIMEOUT_S = "TOWERPLUS_INIT_TIMEOUT", 300
HEARTBEAT_TIMEOUT_ENV, HEARTBEAT_TIMEOUT_S = "TOWERPLUS_HEARTBEAT_TIMEOUT", 60
_GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips sit on the PCI bus under Google's vendor id
_METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/{key}"


def _env_int(environ: Mapping[str, str], *keys: str) -> int | None:
  """The first of `keys` set in `environ`, as an int (None when none is set)."""
  for key in keys:
    if environ.get(key, "").strip():
      try:
        return int(environ[key])
      except ValueError:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from None
  return None


def _on_cloud_tpu_vm() -> bool:
  """A TPU chip on this machine's PCI bus (the check jax itself makes)."""
  for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor_file).read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def _cloud_tpu_worker_count(environ: Mapping[str, str], timeout_s: float = 5.0) -> int:
  """Workers in this TPU slice, from the VM metadata server (1 when it cannot be asked)."""
  url = _METADATA_URL.format(host=environ.get("GCE_METADATA_IP", "metadata.google.internal"),
                             key="worker-network-endpoints")
  request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      endpoints = response.read().decode()
  except OSError as e:
    logging.warning("Cloud TPU VM but the metadata server did not answer (%s): assuming one host", e)
    return 1
  return len([endpoint for endpoint in endpoints.split(",") if endpoint.strip()])


def multi_host_reason(environ: Mapping[str, str] | None = None) -> str | None:
  """Why this process looks like one of several hosts, or None when it runs alone."""
  environ = os.environ if environ is None else environ
  flag = environ.get(ENV_FLAG)
  if flag is not None:
    if flag.strip().lower() in ("1", "true", "yes"):
      return f"{ENV_FLAG}={flag}"
    if flag.strip().lower() in ("0", "false", "no", ""):
      return None
    raise ValueError(f"environment variable {ENV_FLAG}={flag!r}: expected 1/true/yes or 0/false/no")
  for key in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"):
    if environ.get(key):
      return f"{key} is set"
  if (_env_int(environ, "MEGASCALE_NUM_SLICES") or 1) > 1:
    return "MEGASCALE_NUM_SLICES > 1"
  for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if len([h for h in environ.get(key, "").split(",") if h.strip()]) > 1:
      return f"{key} lists several hosts"
  if "SLURM_JOB_ID" in environ and (_env_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1) > 1:
    return "SLURM job with several tasks"
  if (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "Open MPI job with several ranks"
  if _on_cloud_tpu_vm() and _cloud_tpu_worker_count(environ) > 1:
    return "Cloud TPU VM slice with several workers"
  return None


@functools.cache
def initialize() -> None:
  """Joins the JAX distributed system when running multi-host; logs the process and device layout.

  Idempotent: later calls (and a system another library already initialised) do nothing.
  `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` complete `JAX_COORDINATOR_ADDRESS` where no cluster is detected.
  """
  reason = multi_host_reason()
  if reason and not jax.distributed.is_initialized():
    logging.info("multi-host run (%s): jax.distributed.initialize()", reason)
    _join(os.environ)
  logging.info("process %d of %d; %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())


def _join(environ: Mapping[str, str]) -> None:
  """jax.distributed.initialize with our timeouts. A peer that never arrives makes jax abort the process from C++
  (no Python exception), so a watchdog ends it first with one clear line naming the coordinator and process."""
  num, pid = _env_int(environ, "JAX_NUM_PROCESSES"), _env_int(environ, "JAX_PROCESS_ID")
  init_s = _env_int(environ, INIT_TIMEOUT_ENV) or INIT_TIMEOUT_S
  message = (f"multi-host start-up failed: process {'(auto)' if pid is None else pid} of "
             f"{'(auto)' if num is None else num} could not join the coordinator at "
             f"{environ.get('JAX_COORDINATOR_ADDRESS') or '(auto-detected)'} within {init_s} s ({INIT_TIMEOUT_ENV}); "
             "check that every process was started and can reach it")

  def give_up():
    logging.error("%s", message)
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(1)

  watchdog = threading.Timer(init_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(num_processes=num, process_id=pid, initialization_timeout=init_s + 30,
                               heartbeat_timeout_seconds=_env_int(environ, HEARTBEAT_TIMEOUT_ENV) or HEARTBEAT_TIMEOUT_S)
  except Exception as e:  # bad addresses and arguments raise (RuntimeError, ValueError, XlaRuntimeError)
    raise RuntimeError(f"{message}: {e}") from e
  finally:
    watchdog.cancel()
