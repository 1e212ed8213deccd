"""COMET scoring throughput: towerplus_jax.evaluate.comet vs unbabel-comet's `model.predict` on the same checkpoint (CPU).

  python -m bench.comet_throughput [--model=tests/data/comet/regression] [--n=512] [--batch=64] [--steps=3] \
      [--reference_python=/work/comet_venv/bin/python]

N triples cycle through the fixture's 26 (multilingual, an empty and an over-long hypothesis). Ours: `Comet.score`
(length buckets, one compiled program per bucket shape, a data mesh over the local devices); the warm-up call
(compilation) is excluded and the median of `--steps` calls is reported as triples/s. With --reference_python (the
side environment holding unbabel-comet 2.2.7, never the project's) the same triples go through
bench/comet_reference.py there, and the ratio and the largest segment-score difference are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np

from towerplus_jax.evaluate.comet import Comet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "comet")


def triples(n: int) -> list[dict]:
  with open(os.path.join(FIXTURE, "scores.json"), encoding="utf-8") as f:
    base = json.load(f)["triples"]
  return [base[i % len(base)] for i in range(n)]


def ours(model: str, rows: list[dict], batch: int, steps: int, dtype: str) -> tuple[float, np.ndarray]:
  scorer = Comet.load(model, batch_size=batch, dtype=dtype)
  cols = [[r[k] for r in rows] for k in ("src", "mt", "ref")]
  scores = scorer.segment_scores(*cols)  # warm-up: compiles every bucket shape
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    scorer.segment_scores(*cols)
    times.append(time.perf_counter() - start)
  return len(rows) / statistics.median(times), scores


def reference(python: str, model: str, rows: list[dict], batch: int, steps: int) -> tuple[float, np.ndarray]:
  with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8", delete=False) as f:
    json.dump(rows, f, ensure_ascii=False)
  try:
    out = subprocess.run([python, os.path.join(ROOT, "bench", "comet_reference.py"), os.path.abspath(model), f.name,
                          str(batch), str(steps)], capture_output=True, text=True, check=True).stdout
  finally:
    os.remove(f.name)
  result = json.loads(out.strip().splitlines()[-1])
  return result["triples_per_s"], np.asarray(result["scores"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=os.path.join(FIXTURE, "regression"))
  parser.add_argument("--n", type=int, default=512)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--reference_python", default=None, help="python of the side env holding unbabel-comet")
  args = parser.parse_args()
  rows = triples(args.n)
  ours_tps, ours_scores = ours(args.model, rows, args.batch, args.steps, args.dtype)
  print(f"ours           {ours_tps:10.1f} triples/s  ({args.n} triples, batch {args.batch}, {args.dtype})")
  if args.reference_python:
    ref_tps, ref_scores = reference(args.reference_python, args.model, rows, args.batch, args.steps)
    print(f"unbabel-comet  {ref_tps:10.1f} triples/s")
    print(f"ours / unbabel-comet {ours_tps / ref_tps:.2f}x; max |segment score difference| "
          f"{np.abs(ours_scores - ref_scores).max():.2e}")


if __name__ == "__main__":
  main()
