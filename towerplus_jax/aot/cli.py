"""`python -m towerplus_jax.aot`: does a stage fit the chips it is meant for? Compiled by the real TPU compiler.

  python -m towerplus_jax.aot --config=configs/sft.py:gemma2_9b --topology=v5e-16 --config.train.global_batch_size=16
  python -m towerplus_jax.aot --config=configs/grpo.py:gemma2_2b --topology=v5e-8 --num_slices=2 --hlo_out=/tmp/g.hlo
  python -m towerplus_jax.aot --sweep          # every production target (TARGETS), a markdown table
  python -m towerplus_jax.aot --config=configs/sft.py:tiny --devices=8 --hbm_gib=1   # no libtpu: a CPU estimate

With `--topology` (needs libtpu: `pip install -e '.[tpu]'`, x86-64 Linux) every program of the stage is compiled for
libtpu's compile-only devices of that slice (aot/programs.py); nothing runs and nothing is allocated. The report
gives each program's per-chip memory, what the stage holds besides it, the peak against the budget (the chip's HBM
less 1 GiB unless `--hbm_gib`), and the compile time; the exit status is 1 when the stage does not fit, 2 on bad input.
`--devices=N` compiles on N fake CPU devices instead: XLA:CPU's estimate, which under-reports a TPU's use.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from towerplus_jax import errors, sharding
from towerplus_jax.aot import programs, topology
from towerplus_jax.aot.programs import GIB


@dataclasses.dataclass(frozen=True)
class Target:
  """One row of the sweep: a stage config on a TPU slice, checked against the chip's budget (or `budget_gib`)."""

  name: str
  config: str  # configs/<stage>.py:<preset>
  topology: str
  overrides: tuple[str, ...] = ()  # --config.KEY=VALUE flags
  num_slices: int = 1

  def argv(self) -> list[str]:
    slices = [f"--num_slices={self.num_slices}"] if self.num_slices > 1 else []
    return [f"--config={self.config}", f"--topology={self.topology}", *slices, *self.overrides]


_GRPO_2B = ("--config.rl.prompts_per_step=1", "--config.rl.num_generations=8", "--config.data.max_prompt_len=1536",
            "--config.rl.max_completion_len=512")
_LORA = ("--config.lora.rank=16",)  # on every projection (lora.targets' default)
# The production targets (seq 2048). Rows per chip: the global batch over the chips.
TARGETS = (
    Target("sft gemma2_2b, 2 rows/chip", "configs/sft.py:gemma2_2b", "v5e-8", ("--config.train.global_batch_size=16",)),
    Target("wpo gemma2_2b + reference, 1 pair/chip", "configs/wpo.py:gemma2_2b", "v5e-8",
           ("--config.train.global_batch_size=8",)),
    Target("grpo gemma2_2b + reference, 1 row/chip", "configs/grpo.py:gemma2_2b", "v5e-8", _GRPO_2B),
    Target("sft gemma2_9b, 1 row/chip", "configs/sft.py:gemma2_9b", "v5e-16", ("--config.train.global_batch_size=16",)),
    Target("sft qwen2_5_72b, 1 row/chip", "configs/sft.py:qwen2_5_72b", "v5p-64",
           ("--config.train.global_batch_size=32",)),
    Target("cpt gemma2_2b, 4 rows/chip", "configs/cpt.py:gemma2_2b", "v6e-8", ("--config.train.global_batch_size=32",)),
    Target("sft gemma2_9b, 2 rows/chip", "configs/sft.py:gemma2_9b", "v6e-16", ("--config.train.global_batch_size=32",)),
    Target("wpo gemma2_2b + reference, 2 pairs/chip", "configs/wpo.py:gemma2_2b", "v6e-8",
           ("--config.train.global_batch_size=16",)),
    Target("grpo gemma2_2b + reference, 2 rows/chip", "configs/grpo.py:gemma2_2b", "v6e-8",
           _GRPO_2B[:1] + ("--config.rl.num_generations=16",) + _GRPO_2B[2:]),
    Target("cpt qwen2_5_7b, 2 rows/chip", "configs/cpt.py:qwen2_5_7b", "v5p-16", ("--config.train.global_batch_size=16",)),
    Target("wpo qwen2_5_7b + reference, 1 pair/chip", "configs/wpo.py:qwen2_5_7b", "v5p-16",
           ("--config.train.global_batch_size=8",)),
    Target("grpo qwen2_5_7b + reference, 1 row/chip", "configs/grpo.py:qwen2_5_7b", "v5p-16", _GRPO_2B),
    Target("sft gemma2_2b, 2 rows/chip, 2 slices", "configs/sft.py:gemma2_2b", "v5e-8",
           ("--config.train.global_batch_size=32",), num_slices=2),
    Target("sft gemma2_9b LoRA r16, 1 row/chip", "configs/sft.py:gemma2_9b", "v5e-8",
           (*_LORA, "--config.train.global_batch_size=8")),
    Target("grpo gemma2_9b LoRA r16 + reference, 1 row/chip", "configs/grpo.py:gemma2_9b", "v5e-8",
           (*_LORA, *_GRPO_2B)),
    Target("sft qwen2_5_72b LoRA r16, 1 row/chip", "configs/sft.py:qwen2_5_72b", "v6e-16",
           (*_LORA, "--config.train.global_batch_size=16")),
    Target("sft qwen2_5_72b QLoRA int8 r16, 1 row/chip", "configs/sft.py:qwen2_5_72b", "v6e-8",
           (*_LORA, "--config.lora.base_dtype=int8", "--config.train.global_batch_size=8")),
)


def _define_flags() -> dict:
  """CLI flags, defined only when run as a program, so that importing this module defines none."""
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/sft.py:gemma2_2b.",
                                                lock_config=True),
      "topology": flags.DEFINE_string("topology", "", f"TPU slice to compile for: {topology.KNOWN}."),
      "num_slices": flags.DEFINE_integer("num_slices", 0, "Slices (multislice over DCN; 0 = config.mesh.slices)."),
      "mesh": flags.DEFINE_string("mesh", "", "Mesh axes overriding config.mesh, e.g. 'fsdp=8' or "
                                  "'data=2,fsdp=4,tensor=2' (one slice's)."),
      "devices": flags.DEFINE_integer("devices", 0, "No libtpu: compile for this many fake CPU devices instead (an "
                                      "XLA:CPU estimate)."),
      "hbm_gib": flags.DEFINE_float("hbm_gib", 0.0, "Memory budget per chip in GiB (0 = the chip's HBM less 1 GiB; "
                                    "with --devices, 0 = no check)."),
      "hlo_out": flags.DEFINE_string("hlo_out", "", "Write the compiled (optimised) HLO text of the train step here "
                                     "and of each other program beside it (FILE.<program>.txt)."),
      "sweep": flags.DEFINE_bool("sweep", False, "Compile every production target (aot.cli.TARGETS), each in its own "
                                 "process, and print a markdown table; exit 1 if any does not fit."),
      "json": flags.DEFINE_bool("json", False, "Also print the result as one JSON line (what --sweep reads).")}


def parse_mesh(spec: str, base: dict[str, int]) -> dict[str, int]:
  """'fsdp=8,tensor=2' on top of config.mesh; axes not named keep the config's size."""
  sizes = dict(base)
  for part in filter(None, (p.strip() for p in spec.split(","))):
    axis, eq, value = part.partition("=")
    if not eq or axis not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"--mesh: bad entry {part!r}; use AXIS=SIZE with AXIS in {sharding.MESH_AXES}")
    sizes[axis] = int(value)
  return sizes


@dataclasses.dataclass(frozen=True)
class Where:
  """The devices a stage is compiled for, and how they are described in the report."""

  devices: list
  description: str  # e.g. "TPU v5 lite: 16 chips, v5litepod-16 (v5e:4x4)"
  versions: str
  budget_gib: float  # 0 = no check


def where(topology_name: str, slices: int, fake_devices: int, hbm_gib: float) -> Where:
  """libtpu's devices of `topology_name`, else `fake_devices` fake CPU devices (ValueError: one line)."""
  if topology_name:
    version = topology.require_libtpu()
    topo = topology.parse(topology_name, slices)
    devices = topology.devices(topo)
    per_chip = len(devices) // topo.chips  # v4: each TensorCore is a device of its own (half the chip's HBM)
    note = f", {per_chip} devices per chip (figures per device)" if per_chip > 1 else ""
    return Where(devices, f"{devices[0].device_kind}: {topo.describe()}{note}",
                 f"jax {jax.__version__}, libtpu {version}", hbm_gib or topo.budget_gib / per_chip)
  if not fake_devices:
    raise ValueError("--topology=NAME (the TPU compiler) or --devices=N (a CPU estimate) is required")
  if slices > 1:
    raise ValueError(f"--num_slices={slices} needs --topology: CPU devices form one slice")
  jax.config.update("jax_num_cpu_devices", fake_devices)
  devices = jax.devices("cpu")
  return Where(devices, f"{len(devices)} cpu devices", f"jax {jax.__version__}, XLA:CPU estimate (not the TPU "
               "compiler: it under-reports a TPU's use)", hbm_gib)


def _hint(program: programs.Program, budget_gib: float) -> str:
  """The knob to turn when `program` does not fit."""
  state = (program.memory.argument + program.held) / GIB
  if state > 0.7 * budget_gib:
    return (f"the state alone (params, optimizer, reference) takes {state:.1f} GiB per chip: use more chips (a larger "
            "--topology or --num_slices with config.mesh.fsdp spanning them), config.optimizer.mu_dtype=bfloat16, or "
            "config.data.precomputed_reference=True (preference losses)")
  return (f"{program.name} needs {program.memory.temp / GIB:.1f} GiB of temporaries: raise config.train.micro_batches "
          "(gradient accumulation) or lower the rows per chip (config.train.global_batch_size), keep "
          "config.model.remat=full and config.loss.logprob_chunk > 0")


def report(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, place: Where,
           compiled: list[programs.Program]) -> dict:
  """Print the per-chip table and the verdict; return them as a JSON-able dict."""
  print("program                                       arguments   outputs   aliased  temporaries     total  "
        "+ held      peak  lower s  compile s")
  for p in compiled:
    m = p.memory
    cells = [m.argument, m.output, m.alias, m.temp, m.total, p.held, p.peak]
    print(f"{p.name:<44}" + "".join(f"{c / GIB:10.3f}" for c in cells[:3]) + f"{cells[3] / GIB:13.3f}" +
          "".join(f"{c / GIB:10.3f}" for c in cells[4:]) + f"{p.lower_seconds:9.0f}{p.seconds:11.0f}")
  print("(GiB per chip; 'held': what the stage keeps on the chip besides the program's arguments while it runs)")
  worst = max(compiled, key=lambda p: p.peak)
  peak, budget = worst.peak / GIB, place.budget_gib
  fits = not budget or all(p.peak <= budget * GIB for p in compiled)
  if budget:
    verdict = "fits" if fits else "does NOT fit"
    print(f"stage peak {peak:.2f} GiB per chip ({worst.name}): {verdict} in {budget:g} GiB ({100 * peak / budget:.0f}%)")
    if not fits:
      print(f"to fit: {_hint(worst, budget)}")
  rows = [{"name": p.name, "argument_gib": p.memory.argument / GIB, "output_gib": p.memory.output / GIB,
           "alias_gib": p.memory.alias / GIB, "temp_gib": p.memory.temp / GIB, "total_gib": p.memory.total / GIB,
           "held_gib": p.held / GIB, "peak_gib": p.peak / GIB, "lower_s": p.lower_seconds, "compile_s": p.seconds}
          for p in compiled]
  return {"config": config.model.preset, "loss": config.loss.name, "where": place.description,
          "versions": place.versions, "mesh": dict(mesh.shape), "programs": rows, "peak_gib": peak,
          "budget_gib": budget, "fits": fits,
          "compile_s": sum(p.lower_seconds + p.seconds for p in compiled)}


def write_hlo(path: str, compiled: list[programs.Program]) -> list[str]:
  """The train step's compiled HLO text at `path`, each other program's at `path`.<program>.txt."""
  written = []
  for i, p in enumerate(compiled):
    out = path if i == 0 else f"{path}.{p.name.split(' (')[0].replace(' ', '_')}.txt"
    with open(out, "w", encoding="utf-8") as f:
      f.write(p.compiled.as_text())
    written.append(out)
  return written


def run_one(config: ml_collections.ConfigDict, *, topology_name: str = "", num_slices: int = 0, mesh_spec: str = "",
            devices: int = 0, hbm_gib: float = 0.0, hlo_out: str = "") -> dict:
  """Compile every program of the stage for the slice (or fake CPU devices), print the report, return it."""
  sizes = parse_mesh(mesh_spec, dict(config.mesh))
  sizes["slices"] = num_slices or sizes.get("slices", 1)
  place = where(topology_name, sizes["slices"], devices, hbm_gib)
  mesh = sharding.make_mesh(sizes, place.devices)
  cfg = programs.architecture(config)
  print(f"{config.model.preset} ({cfg.family}, loss {config.loss.name}) on {place.description}; mesh "
        f"{dict(mesh.shape)}; global batch {config.train.global_batch_size} x {config.data.seq_len}, micro_batches "
        f"{config.train.micro_batches}, remat {cfg.remat}, scan_layers {cfg.scan_layers}, dtype {cfg.dtype}; "
        f"{place.versions}", flush=True)
  compiled = programs.compile_stage(config, mesh)
  row = report(config, mesh, place, compiled)
  if hlo_out:
    print("compiled HLO: " + ", ".join(write_hlo(hlo_out, compiled)))
  return row


def sweep(targets: tuple[Target, ...] = TARGETS, timeout_s: float = 3600) -> bool:
  """Each target in its own process; prints a markdown table (the peak program's GiB per chip)."""
  print("| target | slice | command flags | peak GiB/chip | budget | compile s | fits |")
  print("|---|---|---|---|---|---|---|")
  all_fit = True
  for t in targets:
    cmd = [sys.executable, "-m", "towerplus_jax.aot", *t.argv(), "--json"]
    row = None
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
      lines = out.stdout.strip().splitlines()
      row = json.loads(lines[-1]) if out.returncode in (0, 1) and lines else None
    except subprocess.TimeoutExpired:
      out = None
    except json.JSONDecodeError:  # the target crashed: its stderr says why
      pass
    flags_text = " ".join(t.argv()[2:])
    if row is None:
      reason = "timed out" if out is None else (out.stderr.strip().splitlines() or ["no output"])[-1]
      print(f"| {t.name} | {t.topology} | `{flags_text}` | failed: {reason} | | | no |", flush=True)
      all_fit = False
      continue
    all_fit &= row["fits"]
    print(f"| {t.name} | {t.topology}{f' x {t.num_slices}' if t.num_slices > 1 else ''} | `{flags_text}` | "
          f"{row['peak_gib']:.2f} | {row['budget_gib']:g} | {row['compile_s']:.0f} | "
          f"{'yes' if row['fits'] else 'NO'} |", flush=True)
  return all_fit


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {argv[1:]}")
  if _F["sweep"].value:
    sys.exit(0 if sweep() else 1)
  if _F["config"].value is None:
    errors.fail("--config is required (or --sweep)")
  try:
    row = run_one(_F["config"].value, topology_name=_F["topology"].value, num_slices=_F["num_slices"].value,
                  mesh_spec=_F["mesh"].value, devices=_F["devices"].value, hbm_gib=_F["hbm_gib"].value,
                  hlo_out=_F["hlo_out"].value)
  except ValueError as e:
    errors.fail(str(e))
  if _F["json"].value:
    print(json.dumps(row))
  if not row["fits"]:
    sys.exit(1)


def cli(argv: list[str] | None = None) -> None:
  """The program (`python -m towerplus_jax.aot`, `towerplus aot`); `argv` as sys.argv (program name first)."""
  global _F
  _F = _define_flags()
  app.run(main, argv=argv, flags_parser=errors.parse_flags)
