"""GRPO completions per second of the train step with packed rollout rows (data.pack=True) vs a row per completion.

  python -m bench.rl_packing [--config=configs/grpo.py:tiny] [--prompts=16] [--generations=4] [--max_prompt=256]
                             [--completion=24] [--rollouts=5]

Rows are max_prompt + completion tokens long, sized (as a run sizes them) for the longest prompt allowed, not the
typical one. Each layout runs the whole loop of the config (rl.iterations = 2: each rollout trains two steps) in a
fresh temporary workdir. A rollout's first step also samples, scores and packs it (the same in either layout, and where a
new row bucket compiles); its second step is the train step alone. Reported: the median time of the second steps
after the first rollout, completions/s = completions a step / that time, and data/fill.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from bench.preference_packing import load_config
from towerplus_jax.run import stage


def run(config_path: str, pack: bool, prompts: int, generations: int, max_prompt: int, completion: int,
        rollouts: int) -> dict[str, float]:
  """Median train step time, completions/s and mean fill of one layout."""
  c = load_config(config_path)
  c.data.update(pack=pack, max_prompt_len=max_prompt)
  c.rl.update(prompts_per_step=prompts, num_generations=generations, max_completion_len=completion, iterations=2)
  c.train.update(steps=2 * rollouts, log_every=1, checkpoint_every=0)
  with tempfile.TemporaryDirectory() as workdir:
    stage.train(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
  step_time = float(np.median([r["perf/step_time"] for r in rows[3::2]]))  # second steps of rollouts 2, 3, ...
  return {"step_time_s": step_time, "completions_per_s": prompts * generations / step_time,
          "fill": float(np.mean([r["data/fill"] for r in rows]))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/grpo.py:tiny")
  parser.add_argument("--prompts", type=int, default=16)
  parser.add_argument("--generations", type=int, default=4)
  parser.add_argument("--max_prompt", type=int, default=256)
  parser.add_argument("--completion", type=int, default=24)
  parser.add_argument("--rollouts", type=int, default=5)
  args = parser.parse_args()
  results = {pack: run(args.config, pack, args.prompts, args.generations, args.max_prompt, args.completion,
                       args.rollouts) for pack in (False, True)}
  for pack, r in results.items():
    print(f"pack={pack!s:5} fill={r['fill']:.3f} train step={r['step_time_s']:.3f}s "
          f"completions/s={r['completions_per_s']:.1f}")
  print(f"packed / unpacked completions/s: "
        f"{results[True]['completions_per_s'] / results[False]['completions_per_s']:.2f}x")


if __name__ == "__main__":
  main()
