"""Ahead-of-time compile check: does a stage's train step fit the memory of a target device mesh?

  python -m towerplus_jax.aot --config=configs/sft.py:gemma2_2b --mesh=fsdp=8 --devices=8 --hbm_gib=16 \
      --config.train.global_batch_size=16
  python -m towerplus_jax.aot --sweep   # every row of TARGETS, one process each, as a markdown table

Nothing is allocated: the model is built with `nnx.eval_shape`, the optimizer state with `jax.eval_shape`, and the
real train step (`train.make_step_fns`, with the shardings training uses) is lowered and compiled for the mesh.
`--devices=N` compiles for N fake CPU devices, so a TPU pod slice can be checked from a laptop; XLA's per-device
memory analysis of the compiled step (arguments, outputs, temporaries) is printed and compared with `--hbm_gib`.
The architecture is `config.model.preset` (vocab `config.model.vocab_size`, else the preset's) with the config's
dtype / param_dtype / remat, traced as on an accelerator (`matmul.accelerator_form`). CPU compilation approximates an
accelerator's memory use (fusion and layout differ).
With `--hbm_gib`, the exit status is 1 when the step does not fit.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from towerplus_jax import losses, optim, sharding, train, weights
from towerplus_jax.data import formats
from towerplus_jax.models import matmul
from towerplus_jax.models.config import ModelConfig, preset
from towerplus_jax.models.transformer import abstract_model

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Target:
  """One row of the memory table: a stage config on a slice, checked against a per-device budget."""

  name: str
  config: str  # configs/<stage>.py:<preset>
  devices: int
  mesh: str
  budget_gib: float
  overrides: tuple[str, ...] = ()  # --config.KEY=VALUE flags

  def argv(self) -> list[str]:
    return [f"--config={self.config}", f"--mesh={self.mesh}", f"--devices={self.devices}",
            f"--hbm_gib={self.budget_gib}", *self.overrides]


# The production targets (seq 2048): v5e chips have 16 GiB (budget 15), v5p 95 GiB (budget 90).
TARGETS = (
    Target("sft gemma2_2b, 2 rows/device, v5e-8", "configs/sft.py:gemma2_2b", 8, "fsdp=8", 15,
           ("--config.train.global_batch_size=16",)),
    Target("wpo gemma2_2b + reference, 1 pair/device, v5e-8", "configs/wpo.py:gemma2_2b", 8, "fsdp=8", 15,
           ("--config.train.global_batch_size=8",)),
    Target("grpo gemma2_2b + reference, 1 row/device, v5e-8", "configs/grpo.py:gemma2_2b", 8, "fsdp=8", 15,
           ("--config.rl.prompts_per_step=1", "--config.rl.num_generations=8", "--config.data.max_prompt_len=1536",
            "--config.rl.max_completion_len=512")),
    Target("sft gemma2_9b, 1 row/device, v5e-16", "configs/sft.py:gemma2_9b", 16, "fsdp=16", 15,
           ("--config.train.global_batch_size=16",)),
    Target("sft qwen2_5_72b, 1 row/device, v5p-64 (32 chips)", "configs/sft.py:qwen2_5_72b", 32, "fsdp=32", 90,
           ("--config.train.global_batch_size=32",)),
)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes of one compiled executable (XLA's memory analysis)."""

  argument: int
  output: int
  alias: int  # outputs written into donated arguments (counted once)
  temp: int

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  def fits(self, hbm_gib: float) -> bool:
    return self.total <= hbm_gib * GIB

  def lines(self) -> list[str]:
    rows = [("arguments", self.argument), ("outputs", self.output), ("aliased (donated)", self.alias),
            ("temporaries", self.temp), ("total", self.total)]
    return [f"  {name:<18} {b / GIB:9.3f} GiB {b / 2 ** 20:12.1f} MiB" for name, b in rows]


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The stage's architecture: its preset with the config's vocab size, dtypes and remat policy."""
  cfg = preset(config.model.preset)
  return cfg.replace(vocab_size=config.model.vocab_size or cfg.vocab_size, **weights.model_overrides(config))


def parse_mesh(spec: str, base: dict[str, int]) -> dict[str, int]:
  """'fsdp=8,tensor=2' on top of config.mesh; axes not named keep the config's size."""
  sizes = dict(base)
  for part in filter(None, (p.strip() for p in spec.split(","))):
    axis, eq, value = part.partition("=")
    if not eq or axis not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh: bad entry {part!r}; use AXIS=SIZE with AXIS in {sharding.MESH_AXES}")
    sizes[axis] = int(value)
  return sizes


def batch_fields(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of every array of one global batch of the stage's batch format as the step receives it (the
  data counts popped)."""
  fmt = losses.get(config.loss.name).batch_format
  b, t = config.train.global_batch_size, config.data.seq_len
  optional = ["record_index"]  # preference rows carry their record's index
  if config.data.precomputed_reference:
    optional += fmt.reference
  if fmt is formats.RL:
    t = (config.data.max_prompt_len or config.data.seq_len // 2) + config.rl.max_completion_len
    optional += ["old_logps", "old_is_current"] if config.rl.iterations > 1 else []
  return fmt.abstract({"B": b, "T": t}, optional)


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as sharded shapes (split over the batch axes, as `sharding.shard_global_batch` does)."""
  spec = lambda shape: sharding.batch_spec(len(shape), mesh, shape[0]) if shape else P()
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec(shape)))
          for k, (shape, dt) in batch_fields(config).items()}


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.stages.Compiled:
  """Lower and compile the stage's train step for `mesh` from abstract params, optimizer state and batch."""
  cfg = model_config(config)
  loss = losses.get(config.loss.name)
  graphdef, params = nnx.split(abstract_model(cfg))
  tx, lr = optim.make(config.optimizer, config.train.steps)
  replicated = NamedSharding(mesh, P())
  params_sh = sharding.state_shardings(params, mesh)
  state_sh = {"params": params_sh, "opt_state": train._opt_shardings(tx, params, params_sh, replicated),
              "step": replicated, "rng": replicated}
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32),
           "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
  use_reference = loss.needs_reference(config.loss) and not config.data.precomputed_reference
  ref_params, ref_sh = (params, params_sh) if use_reference else (None, None)
  batch = abstract_batch(config, mesh)
  fns = train.make_step_fns(graphdef, loss, config.loss, tx, lr, config.train.micro_batches, use_reference)
  step = jax.jit(fns.train, in_shardings=(state_sh, ref_sh, jax.tree.map(lambda x: x.sharding, batch)),
                 out_shardings=(state_sh, None), donate_argnums=0)
  with jax.set_mesh(mesh), matmul.accelerator_form():
    return step.lower(state, ref_params, batch).compile()


def memory_report(compiled: jax.stages.Compiled) -> MemoryReport:
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis of compiled executables")
  return MemoryReport(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                      m.temp_size_in_bytes)


def use_fake_devices(n: int) -> None:
  """Make the CPU backend expose `n` devices (jax raises if a backend is already initialised)."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def _define_flags() -> dict:
  """CLI flags, defined only when run as a program, so that importing this module defines none."""
  defined = {
      "config": config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/sft.py:gemma2_2b.",
                                                lock_config=True),
      "mesh": flags.DEFINE_string("mesh", "", "Mesh axes overriding config.mesh, e.g. 'fsdp=8' or "
                                  "'data=2,fsdp=4,tensor=2'."),
      "devices": flags.DEFINE_integer("devices", 0, "Compile for this many fake CPU devices (0 = the real devices)."),
      "hbm_gib": flags.DEFINE_float("hbm_gib", 0.0, "Memory per device in GiB to check against (v5e 16, v5p 95); "
                                    "0 = no check; the exit status is 1 when it does not fit."),
      "sweep": flags.DEFINE_bool("sweep", False, "Compile every production target (aot.TARGETS), each in its own "
                                 "process, and print a markdown table; exit 1 if any does not fit."),
      "json": flags.DEFINE_bool("json", False, "Also print the result as one JSON line (what --sweep reads).")}
  return defined


def run_one(config: ml_collections.ConfigDict, mesh_spec: str, hbm_gib: float) -> dict:
  """Compile the stage's train step for the mesh, print the report, return it as a dict."""
  mesh = sharding.make_mesh(parse_mesh(mesh_spec, dict(config.mesh)))
  cfg = model_config(config)
  params = nnx.state(abstract_model(cfg))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{config.model.preset} ({cfg.family}, {n_params / 1e6:,.1f} M params, loss {config.loss.name}) on mesh "
        f"{dict(mesh.shape)} of {jax.device_count()} {jax.devices()[0].platform} devices; global batch "
        f"{config.train.global_batch_size} x {config.data.seq_len}, micro_batches {config.train.micro_batches}, "
        f"remat {cfg.remat}, scan_layers {cfg.scan_layers}, dtype {cfg.dtype}")
  start = time.perf_counter()
  report = memory_report(compile_train_step(config, mesh))
  seconds = time.perf_counter() - start
  print(f"per-device memory of the compiled train step (compiled in {seconds:.0f} s):")
  print("\n".join(report.lines()))
  fits = not hbm_gib or report.fits(hbm_gib)
  if hbm_gib:
    print(f"{'fits' if fits else 'does NOT fit'} in {hbm_gib:g} GiB per device "
          f"({100 * report.total / (hbm_gib * GIB):.0f}% used)")
  return {"total_gib": report.total / GIB, "temp_gib": report.temp / GIB, "argument_gib": report.argument / GIB,
          "compile_s": seconds, "fits": fits}


def sweep(targets: tuple[Target, ...] = TARGETS, timeout_s: float = 3600) -> bool:
  """Each target in its own process (the fake device count is fixed per process); prints a markdown table."""
  print("| target | command flags | per-device GiB | budget | compile s | fits |")
  print("|---|---|---|---|---|---|")
  all_fit = True
  for t in targets:
    cmd = [sys.executable, "-m", "towerplus_jax.aot", *t.argv(), "--json"]
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
      lines = out.stdout.strip().splitlines()
      row = json.loads(lines[-1]) if out.returncode in (0, 1) and lines else None
    except subprocess.TimeoutExpired:
      out, row = None, None
    except json.JSONDecodeError:  # the target crashed (exit 1 of an uncaught error): its stderr says why
      row = None
    if row is None:
      reason = "timed out" if out is None else (out.stderr.strip().splitlines() or ["no output"])[-1]
      print(f"| {t.name} | `{' '.join(t.argv())}` | failed: {reason} | {t.budget_gib:g} | | no |", flush=True)
      all_fit = False
      continue
    all_fit &= row["fits"]
    print(f"| {t.name} | `{' '.join(t.argv())}` | {row['total_gib']:.1f} | {t.budget_gib:g} | "
          f"{row['compile_s']:.0f} | {'yes' if row['fits'] else 'NO'} |", flush=True)
  return all_fit


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _F["sweep"].value:
    sys.exit(0 if sweep() else 1)
  if _F["config"].value is None:
    raise app.UsageError("--config is required (or --sweep)")
  if _F["devices"].value:
    use_fake_devices(_F["devices"].value)
  row = run_one(_F["config"].value, _F["mesh"].value, _F["hbm_gib"].value)
  if _F["json"].value:
    print(json.dumps(row))
  if not row["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  _F = _define_flags()
  app.run(main)
