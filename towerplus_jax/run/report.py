"""What a finished run produced, as the short summary printed at its end: per stage the final metrics, how its own
objective moved, and where the checkpoints, metrics, eval report and export command are."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections
from etils import epath

from towerplus_jax import losses

# Each stage's own objective (by its loss's batch format): the summary shows how it moved from the start to the end
# of training.
TREND_KEYS = {"lm": ("loss",), "sft": ("loss",), "preference": ("loss", "rewards/accuracies", "rewards/margins"),
              "rl": ("reward/mean",)}


def trend(folder: str, keys: Sequence[str]) -> tuple[dict[str, tuple[float, float]], int]:
  """`({key: (first, last)}, window)`: each key's mean over the first and over the last `window` training rows of
  `folder/metrics.jsonl` (a quarter of them, at least one: single logged steps are noisy)."""
  path = epath.Path(folder) / "metrics.jsonl"
  lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
  rows = [row for line in lines if line.strip() and "loss" in (row := json.loads(line))]
  window = max(1, len(rows) // 4)
  mean = lambda part, k: sum(r[k] for r in part) / len(part)
  return {k: (mean(rows[:window], k), mean(rows[-window:], k)) for k in keys if rows and k in rows[0]}, window


def trend_keys(stage_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The metrics of a stage's own objective: TREND_KEYS of its loss's batch format."""
  return TREND_KEYS[losses.get(stage_config.loss.name).batch_format.name]


def summary(results: dict, workdir: str, config) -> str:
  """What a finished run produced: per stage the final/eval loss and held-out scores, how its own objective moved
  (first -> last logged steps), and where things are."""
  stages = results if "stages" in config else {"": results}
  lines = [f"run finished: {workdir}"]
  for name, metrics in stages.items():
    folder = os.path.join(workdir, name) if name else workdir
    shown = [f"{k} {metrics[k]:.4g}" for k in ("loss", "eval/loss", "reward/mean", "heldout/chrf", "heldout/bleu")
             if k in metrics]
    lines.append(f"  {name or 'stage'}: {', '.join(shown) or 'no metrics'}")
    moved, window = trend(folder, trend_keys(config.stages[name] if name else config))
    if moved:
      lines.append(f"    {', '.join(f'{k} {a:.3g} -> {b:.3g}' for k, (a, b) in moved.items())} "
                   f"(first -> last: means of {window} logged steps each)")
    lines.append(f"    checkpoints {os.path.join(folder, 'checkpoints')}, metrics "
                 f"{os.path.join(folder, 'metrics.jsonl')}")
    if os.path.exists(os.path.join(folder, "eval", "report.json")):
      lines.append(f"    eval report {os.path.join(folder, 'eval', 'report.json')}")
  last = os.path.join(workdir, list(stages)[-1]) if "stages" in config else workdir
  lines.append(f"  TensorBoard: tensorboard --logdir={workdir}")
  lines.append(f"  export: python -m towerplus_jax.convert.hf export --workdir={last} --out={last.rstrip('/')}_hf")
  return "\n".join(lines)
