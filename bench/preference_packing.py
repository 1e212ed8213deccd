"""WPO pairs per second with packed rows (data.pack=True) vs one row per side, on the sample preferences.

  python -m bench.preference_packing [--config=configs/wpo.py:tiny] [--batch=64] [--seq=512] [--steps=12]

Each layout trains `--steps` steps of the config in a fresh temporary workdir (the whole loop: data, reference pass,
step, logging); reported: the median step time over the steps after the first two (compilation; a packed step whose
row bucket is new compiles once more, which the median leaves out), pairs/s = batch / that time, and data/fill.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile

import ml_collections
import numpy as np

from towerplus_jax.run import stage


def load_config(config_path: str) -> ml_collections.ConfigDict:
  """The config of FILE[:ARG] (ARG default tiny), as --config= reads it."""
  module, _, arg = config_path.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", module)
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  return config_module.get_config(arg or "tiny")


def run(config_path: str, pack: bool, batch: int, seq: int, steps: int) -> dict[str, float]:
  """Median step time, pairs/s and mean fill of one layout."""
  c = load_config(config_path)
  c.data.update(pack=pack, seq_len=seq)
  c.train.update(steps=steps, global_batch_size=batch, log_every=1, checkpoint_every=0)
  with tempfile.TemporaryDirectory() as workdir:
    stage.train(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
  step_time = float(np.median([r["perf/step_time"] for r in rows[2:] if "perf/step_time" in r]))
  return {"step_time_s": step_time, "pairs_per_s": batch / step_time,
          "fill": float(np.mean([r["data/fill"] for r in rows]))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/wpo.py:tiny")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--steps", type=int, default=12)
  args = parser.parse_args()
  results = {pack: run(args.config, pack, args.batch, args.seq, args.steps) for pack in (False, True)}
  for pack, r in results.items():
    print(f"pack={pack!s:5} fill={r['fill']:.3f} step={r['step_time_s']:.3f}s pairs/s={r['pairs_per_s']:.1f}")
  print(f"packed / unpacked pairs/s: {results[True]['pairs_per_s'] / results[False]['pairs_per_s']:.2f}x")


if __name__ == "__main__":
  main()
