"""Our train step at a git ref vs the working tree, interleaved in one process: the speed-up a change buys.

  python -m bench.compare_refs --ref=HEAD~1 [--family=gemma2] [model flags] [--batch=8] [--seq=256] [--steps=20]

The ref's `towerplus_jax` is extracted (`git archive`) into a temporary directory and imported as
`towerplus_jax_ref` (its imports renamed), so both step functions (bench/train_throughput.ours_step) run in this
process and take turns step by step: a change in machine load hits both alike, which makes the ratio usable on a
shared machine where absolute figures are not. Prints the median step times and their ratio.
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
from flax import nnx

from bench import common, train_throughput

REF_PACKAGE = "towerplus_jax_ref"


def extract(ref: str, dest: pathlib.Path) -> None:
  """`towerplus_jax` at git `ref` as package `REF_PACKAGE` under `dest`."""
  root = pathlib.Path(__file__).resolve().parents[1]
  archive = subprocess.run(["git", "-C", str(root), "archive", ref, "towerplus_jax"], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
  (dest / "towerplus_jax").rename(dest / REF_PACKAGE)
  for path in (dest / REF_PACKAGE).rglob("*.py"):
    path.write_text(re.sub(r"\btowerplus_jax\b", REF_PACKAGE, path.read_text()))


def step_fn(lib: str, args: argparse.Namespace, total_steps: int):
  """A blocking train step of package `lib` on the benchmark's model and batch."""
  config_cls = importlib.import_module(f"{lib}.models.config").ModelConfig
  transformer = importlib.import_module(f"{lib}.models.transformer").Transformer
  sharding = importlib.import_module(f"{lib}.sharding")
  cfg = common.model_config(args, config_cls)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  model = sharding.create_sharded(lambda: transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  batch = train_throughput.token_batch(cfg, args.batch, args.seq)
  return train_throughput.ours_step(model, batch, total_steps, args.logprob_chunk, lib)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument("--ref", default="HEAD", help="git ref to compare the working tree against")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--logprob_chunk", type=int, default=0)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    extract(args.ref, pathlib.Path(tmp))
    sys.path.insert(0, tmp)
    fns = {lib: step_fn(lib, args, args.steps + args.warmup) for lib in (REF_PACKAGE, "towerplus_jax")}
    seconds = common.median_seconds(fns, args.steps, args.warmup)
  for lib, sec in seconds.items():
    print(f"{lib:>18}: {sec * 1e3:8.1f} ms/step (median)")
  ratio = seconds[REF_PACKAGE] / seconds["towerplus_jax"]
  print(f"speed-up working tree / {args.ref}: {ratio:.3f}x (medians)")


if __name__ == "__main__":
  main()
