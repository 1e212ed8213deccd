"""`python -m towerplus_jax.aot`: see cli.py."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no accelerator backend

from towerplus_jax.aot import cli  # noqa: E402  (after the environment)

cli.cli()
