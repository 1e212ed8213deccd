"""The unbabel-comet side of bench/comet_throughput.py, run by the side environment's python (see
tools/make_comet_fixture.py for how to build it): imports only comet and torch.

  /work/comet_venv/bin/python bench/comet_reference.py MODEL_DIR TRIPLES.json BATCH STEPS
prints one JSON line {"triples_per_s": median over STEPS timed calls after one warm-up, "scores": [...]}.
"""
import json
import os
import statistics
import sys
import time

import torch
from comet import load_from_checkpoint


def main(model_dir: str, triples_path: str, batch: str, steps: str) -> None:
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  with open(triples_path, encoding="utf-8") as f:
    triples = json.load(f)
  os.chdir(model_dir)  # hparams' pretrained_model may be a path relative to the model folder
  model = load_from_checkpoint(os.path.join(model_dir, "checkpoints", "model.ckpt"))
  run = lambda: model.predict(triples, batch_size=int(batch), gpus=0, progress_bar=False)
  pred = run()  # warm-up
  times = []
  for _ in range(int(steps)):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  print(json.dumps({"triples_per_s": len(triples) / statistics.median(times), "scores": list(pred.scores)}))


if __name__ == "__main__":
  main(*sys.argv[1:])
