"""The Hugging Face side of bench/train_throughput.py in its own process: one train step per `step` line read.

  python -m bench.hf_train_worker HF_DIR BATCH_NPZ DTYPE   # started by train_throughput; answers `ready`, then `done`

Its own process, so that torch runs under glibc's malloc as a transformers user's does: importing towerplus_jax
changes malloc process-wide on CPU (towerplus_jax/host_memory.py), and train_throughput starts this worker with
`TOWERPLUS_KEEP_HOST_MEMORY=0` unless asked to give HF the same setting (`--hf_malloc=ours`).
"""
from __future__ import annotations

import sys

import numpy as np

from bench import common, train_throughput


def main(argv: list[str]) -> None:
  hf_dir, batch_npz, dtype = argv
  model = common.load_hf(hf_dir, common.torch_setup()[1])
  step = train_throughput.hf_step(model, dtype, dict(np.load(batch_npz)))
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      raise SystemExit(f"hf_train_worker: unexpected command {line.strip()!r}")
    step()
    print("done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
