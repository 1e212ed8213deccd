"""host_memory: on CPU, a jitted step's large temporaries are reused, not page-faulted in again on every call."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from towerplus_jax import host_memory

# A child that imports towerplus_jax first (as our entry points do), then calls a program whose two [4096, 8192]
# float32 temporaries (128 MiB each) outlive one fusion, and prints the minor page faults of each call.
CHILD = """
import json, resource
import towerplus_jax
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T) + jnp.sum(jnp.exp(x @ w)))
x, w = jnp.ones((4096, 64)) / 64, jnp.ones((64, 8192)) / 64
faults = []
for _ in range(18):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
TEMP_PAGES = 4096 * 8192 * 4 // 4096  # one temporary, in 4 KiB pages


def faults_per_call(setting: str) -> float:
  """The median over the last 6 of 18 calls (the heap settles in the first few)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {host_memory.ENV: setting, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return statistics.median(json.loads(out.stdout.strip().splitlines()[-1])[-6:])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc")
def test_large_temporaries_are_reused_instead_of_page_faulted_every_call():
  kept, system = faults_per_call("1"), faults_per_call("0")
  assert kept < TEMP_PAGES / 100, (kept, system)
  assert system > kept, (kept, system)  # glibc's defaults: every call maps them afresh (the measurement can fail)


BREAK_CHILD = """
import ctypes, json
import towerplus_jax
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_void_p], [ctypes.c_long]
start = libc.sbrk(0)
block = libc.malloc(5 << 29)  # 2.5 GiB, never touched
grown = libc.sbrk(0)
libc.free(block)
print(json.dumps([grown - start, libc.sbrk(0) - start]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc")
def test_a_freed_block_over_2_gib_stays_in_the_heap():
  """mallopt's trim threshold is an int: only -1 keeps a larger top of the heap (a 4 GiB step was trimmed)."""
  env = os.environ | {host_memory.ENV: "1"}
  out = subprocess.run([sys.executable, "-c", BREAK_CHILD], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  grown, after_free = json.loads(out.stdout)
  assert grown > 2 << 30 and after_free == grown, (grown, after_free)


def test_auto_is_on_for_cpu_only_jax():
  assert host_memory.wanted("auto", "cpu")
  assert not host_memory.wanted("auto", "tpu")
  assert not host_memory.wanted("auto", "cuda,cpu")
  assert host_memory.wanted("1", "tpu") and not host_memory.wanted("0", "cpu")


def test_auto_without_jax_platforms_follows_the_installed_plugins(monkeypatch):
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: True)
  assert not host_memory.wanted("auto", "")
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: False)
  assert host_memory.wanted("auto", "")


def test_a_bad_setting_is_one_line_naming_the_variable():
  with pytest.raises(ValueError, match=r"^TOWERPLUS_KEEP_HOST_MEMORY='yes': expected auto, 1 or 0$"):
    host_memory.wanted("yes", "")
