"""Keep freed host memory for reuse when JAX runs on the CPU (set once, at package import).

XLA CPU allocates each execution's temporaries as one block (520 MB for the benchmark's train step) from the thread
that runs it. glibc serves a block that size from a fresh `mmap` and unmaps it on free, so every step page-faults all
of it back in: a fifth of a CPU train step went to the kernel. With one malloc arena, no `mmap` and no trimming, the
freed block stays in the heap and the next step reuses it (no page faults once the heap has settled). The setting
must precede the start of JAX's backend, whose threads pick their malloc arena at their first allocation, so it runs
when `towerplus_jax` is imported. Measured on 2 CPU cores (bench/README.md): train steps 18-21% shorter, compilation
~15% longer (the compiler's threads share the one arena).

`TOWERPLUS_KEEP_HOST_MEMORY`: `auto` (default: on when JAX can only run on the CPU, i.e. `JAX_PLATFORMS=cpu`, or no
TPU/GPU plugin is installed), `1` (always, on glibc), `0` (never: glibc's defaults). Accelerator hosts keep glibc's
defaults under `auto`: there the big buffers live on the device, and the host's memory is better returned.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

ENV = "TOWERPLUS_KEEP_HOST_MEMORY"
# mallopt(3) parameters (malloc.h): heap trim threshold, largest number of mmap'd chunks, number of arenas.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


def accelerator_plugin_installed() -> bool:
  """Whether JAX could find a TPU or GPU backend (libtpu, or a PJRT plugin by entry point or namespace package)."""
  if importlib.util.find_spec("libtpu") or importlib.metadata.entry_points(group="jax_plugins"):
    return True
  spec = importlib.util.find_spec("jax_plugins")
  return bool(spec and any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations)))


def wanted(setting: str, jax_platforms: str) -> bool:
  """`setting` is the env value; `jax_platforms` is `JAX_PLATFORMS` ("" when unset)."""
  if setting not in ("auto", "0", "1"):
    raise ValueError(f"{ENV}={setting!r}: expected auto, 1 or 0")
  if setting != "auto":
    return setting == "1"
  if jax_platforms:
    return jax_platforms.strip().lower() == "cpu"
  return not accelerator_plugin_installed()


def keep_freed_memory() -> bool:
  """Apply the setting (see the module docstring); returns whether glibc's malloc now keeps freed memory."""
  if not wanted(os.environ.get(ENV, "auto"), os.environ.get("JAX_PLATFORMS", "")):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM)))
