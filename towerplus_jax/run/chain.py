"""A run: check every stage's values, take the workdir's lock, then train the stage, or each stage of a chain
(configs/tower_plus.py) in order, each in WORKDIR/<stage> initialised from the previous stage's checkpoint, with
held-out scores after each when `eval_data` is set."""
from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging
from etils import epath

from towerplus_jax import distributed, errors
from towerplus_jax.config import config_check
from towerplus_jax.files import run_lock
from towerplus_jax.run import stage
from towerplus_jax.training.metrics_writer import MetricsWriter


def check_names(config: ml_collections.ConfigDict) -> None:
  """Every stage's preset / init_from resolves (ValueError otherwise), before anything is written."""
  for stage_config in config.stages.values() if "stages" in config else [config]:
    config_check.check_names(stage_config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Check every stage's values, then train the stage, or each stage of a chain in order. A workdir this call
  created is removed again when bad input stops the run before any checkpoint was saved (nothing half-made is left);
  an existing one is never touched before the run is known to be valid (see run/setup_run.py)."""
  config_check.check(config)
  distributed.initialize()
  folder = epath.Path(workdir)
  if folder.exists() and not folder.is_dir():
    raise NotADirectoryError(f"--workdir={workdir} is an existing file, not a run folder: choose another --workdir")
  new = not folder.exists()
  try:
    with run_lock.hold(workdir):
      return _run_locked(config, workdir)
  except errors.BAD_INPUT:
    if new and jax.process_index() == 0 and folder.exists() and not _has_checkpoints(folder):
      folder.rmtree()
    raise


def _has_checkpoints(folder: epath.Path) -> bool:
  """Whether a run folder (or a chain's stage folder in it) holds a saved checkpoint step."""
  for steps in (folder / "checkpoints", *(p / "checkpoints" for p in folder.iterdir() if p.is_dir())):
    if steps.is_dir() and any(p.name.split(".")[0].isdigit() for p in steps.iterdir()):
      return True
  return False


def _run_locked(config: ml_collections.ConfigDict, workdir: str) -> dict:
  if "stages" not in config:
    return stage.train(config, workdir)
  results, previous = {}, None
  for name in config.stage_order:
    stage_config = config.stages[name]
    if stage_config.init_from == "previous":
      with stage_config.unlocked():
        stage_config.init_from = f"ckpt:{os.path.join(workdir, previous)}" if previous else ""
    logging.info("=== stage %s ===", name)
    stage_dir = os.path.join(workdir, name)
    results[name] = stage.train(stage_config, stage_dir)
    if config.eval_data:
      scores = held_out_scores(config, stage_dir)
      results[name].update(scores)
      _append_metrics(stage_dir, stage_config.train.steps, scores)
      logging.info("stage %s held-out: chrF %.2f BLEU %.2f", name, results[name]["heldout/chrf"],
                   results[name]["heldout/bleu"])
    previous = name
  return results


def held_out_scores(config: ml_collections.ConfigDict, stage_dir: str) -> dict[str, float]:
  """chrF and BLEU of a finished stage on the chain's `eval_data`."""
  from towerplus_jax.data import records as records_lib
  from towerplus_jax.data import sources
  from towerplus_jax.evaluate import translation  # the generation stack only for chains with held-out data
  records = records_lib.read_all(sources.open_source(sources.resolve_sources(config.eval_data)), "test")
  model, tokenizer, template = translation.load(stage_dir)
  report = translation.evaluate(model, tokenizer, template, records, os.path.join(stage_dir, "eval"),
                                max_new_tokens=config.eval_max_new_tokens)
  return {f"heldout/{k}": report["overall"][k] for k in ("chrf", "bleu")}


def _append_metrics(workdir: str, step: int, metrics: dict[str, float]) -> None:
  """End-of-stage scores into the stage's metrics.jsonl and TensorBoard, next to its training metrics."""
  writer = MetricsWriter(workdir, step, 0.0)
  writer.write(step, metrics)
  writer.close()
