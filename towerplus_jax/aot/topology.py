"""Cloud TPU slice names -> libtpu's compile-only devices (the real TPU compiler, no TPU needed) and chip memory.

`v5e-16` / `v5litepod-16` / `v6e-8` count chips; `v4-32` / `v5p-64` count TensorCores (2 per chip); the raw form
`v5e:4x4` / `v5p:2x4x4` names the chip grid. Only x86-64 Linux has libtpu wheels (`pip install -e '.[tpu]'`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import platform
import re

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  cores_in_name: int  # TensorCores per chip as counted by the accelerator type's number (v4-8 = 4 chips)
  grid_dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) chip grid


CHIPS = {"v4": Chip(32, 2, 3), "v5e": Chip(16, 1, 2), "v5p": Chip(95, 2, 3), "v6e": Chip(32, 1, 2)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
KNOWN = "v4-N, v5e-N (= v5litepod-N), v5p-N, v6e-N (N: chips for v5e/v6e, TensorCores for v4/v5p) or a chip grid " \
        "such as v5e:4x4, v6e:2x4, v5p:2x4x4"


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice (or `num_slices` of them) to compile for."""

  name: str  # as the user gave it
  family: str  # v4 | v5e | v5p | v6e
  grid: tuple[int, ...]  # chips per slice along each grid axis
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.grid) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{self.family}:{'x'.join(map(str, self.grid))}"

  @property
  def hbm_gib(self) -> float:
    return CHIPS[self.family].hbm_gib

  @property
  def budget_gib(self) -> float:
    """The default memory budget per chip: HBM less 1 GiB for the runtime and fragmentation."""
    return self.hbm_gib - 1

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name of one slice, e.g. v5litepod-16, v5p-64."""
    chips = math.prod(self.grid)
    return f"{'v5litepod' if self.family == 'v5e' else self.family}-{chips * CHIPS[self.family].cores_in_name}"

  def describe(self) -> str:
    slices = f"{self.num_slices} slices of " if self.num_slices > 1 else ""
    return f"{self.chips} chips, {slices}{self.accelerator_type} ({self.libtpu_name})"


def _grid(family: str, chips: int) -> tuple[int, ...]:
  """The chip grid of a slice of `chips` chips: from 2x2(x1), double the smallest axis (the last of equals)."""
  dims = CHIPS[family].grid_dims
  if chips == 1:
    return (1,) * dims
  grid = [2, 2] + [1] * (dims - 2)
  while math.prod(grid) < chips:
    i = max(j for j, v in enumerate(grid) if v == min(grid))
    grid[i] *= 2
  if math.prod(grid) != chips:
    sizes = [1] + [4 << k for k in range(7)]
    unit = CHIPS[family].cores_in_name
    raise ValueError(f"--topology: a {family} slice has {', '.join(str(n * unit) for n in sizes)} "
                     f"{'TensorCores' if unit > 1 else 'chips'}, not {chips * unit}")
  return tuple(grid)


def parse(name: str, num_slices: int = 1) -> Topology:
  """`v5e-16`, `v5litepod-16`, `v5p-64`, `v4-8`, `v6e-8` or `v5e:4x4` -> Topology (ValueError naming the known
  kinds otherwise)."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: must be >= 1")
  m = re.fullmatch(r"([a-z0-9]+)([-:])([0-9x]+)", name.strip().lower())
  family = ALIASES.get(m.group(1), m.group(1)) if m else ""
  if family not in CHIPS:
    raise ValueError(f"--topology={name}: unknown TPU type; known: {KNOWN}")
  if m.group(2) == ":":
    grid = tuple(int(d) for d in m.group(3).split("x") if d)
    if len(grid) != CHIPS[family].grid_dims or min(grid) < 1:
      raise ValueError(f"--topology={name}: a {family} chip grid has {CHIPS[family].grid_dims} axes, e.g. "
                       f"{family}:{'x'.join(['2'] * CHIPS[family].grid_dims)}")
  else:
    if not m.group(3).isdigit():
      raise ValueError(f"--topology={name}: unknown TPU type; known: {KNOWN}")
    count, unit = int(m.group(3)), CHIPS[family].cores_in_name
    if count % unit:
      raise ValueError(f"--topology={name}: {family}-N counts TensorCores ({unit} per chip): N must be even")
    grid = _grid(family, count // unit)
  return Topology(name, family, grid, num_slices)


def require_libtpu() -> str:
  """libtpu's version; a ValueError with the install command when it is missing or cannot exist here."""
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    raise ValueError(f"the TPU compiler (libtpu) has wheels for x86-64 Linux only, this is {platform.system()} "
                     f"{platform.machine()}: use --devices=N for a CPU estimate")
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("the TPU compiler needs libtpu: pip install -e '.[tpu]' (or --devices=N for a CPU estimate)")
  return importlib.metadata.version("libtpu")


def devices(topology: Topology) -> list[jax.Device]:
  """libtpu's compile-only devices of the topology (nothing runs on them; programs compile and report memory)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # nothing runs: other compiling processes are no harm
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs that it found none (at start-up)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)  # likewise; the topology name decides
  from jax.experimental import topologies
  kwargs = {"num_slices": topology.num_slices}
  if topology.chips // topology.num_slices == 1:  # one chip: the default host bounds (2x2x1) refuse a 1x1 grid
    kwargs["chips_per_host_bounds"] = (1, 1, 1)
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name, **kwargs).devices)
