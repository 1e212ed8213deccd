"""Ahead-of-time compilation of a stage's programs for a TPU slice (libtpu's compile-only devices) or fake CPU
devices, with per-chip memory: `python -m towerplus_jax.aot` (cli.py); topology.py names slices, programs.py builds
and compiles every program a stage runs."""
