"""Test-session set-up shared by every test: 8 fake CPU devices for the multi-device tests, float32 matmuls,
glibc's default malloc, and one persistent compilation cache per test session (shared by the xdist workers and every
child process the tests start), so a program that several tests compile identically (the tiny train steps,
samplers) compiles once."""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compilation-bound: glibc's many arenas compile ~15% faster than host_memory's one (its own tests set it).
os.environ.setdefault("TOWERPLUS_KEEP_HOST_MEMORY", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run): the workers inherit it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="towerplus_test_jax_cache_")
  os.environ["TOWERPLUS_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # > 0: reads and writes under a file lock

import jax  # noqa: E402  (after the environment)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: multi-minute tests (multi-process runs); still part of the suite")


def pytest_unconfigure(config):
  if os.environ.get("TOWERPLUS_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
