"""The Hugging Face side of a benchmark in its own process: one HF call per `step` line read.

  python -m bench.hf_worker train DIR DTYPE           # bench/train_throughput.py: one train step per call
  python -m bench.hf_worker generate DIR OPTIONS_JSON  # bench/sampler_throughput.py: one `generate` per call

DIR holds the HF model (our weights, `common.save_hf_twin`) and its inputs (`inputs.npz`); the worker answers
`ready`, then `done` per call (`common.worker_step`). `generate` first writes its first call's tokens to
DIR/tokens.npy (the greedy agreement check). Its own process, so that torch runs under glibc's malloc as a
transformers user's does: importing towerplus_jax changes malloc process-wide on CPU (towerplus_jax/host_memory.py),
and `common.hf_worker` starts this worker with `TOWERPLUS_KEEP_HOST_MEMORY=0` unless asked to give HF the same
setting (`--hf_malloc=ours`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np

from bench import common, sampler_throughput, train_throughput


def make_step(kind: str, directory: str, arg: str) -> Callable[[], object]:
  model = common.load_hf(directory, common.torch_setup()[1])
  inputs = dict(np.load(f"{directory}/inputs.npz"))
  if kind == "train":
    return train_throughput.hf_step(model, arg, inputs)
  if kind == "generate":
    options = argparse.Namespace(**json.loads(arg))
    step = sampler_throughput.hf_generate(model, inputs["prompts_BP"], options.new, options.greedy, options)
    np.save(f"{directory}/tokens.npy", step())
    return step
  raise SystemExit(f"hf_worker: unknown kind {kind!r} (train or generate)")


def main(argv: list[str]) -> None:
  step = make_step(*argv)
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      raise SystemExit(f"hf_worker: unexpected command {line.strip()!r}")
    step()
    print("done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
