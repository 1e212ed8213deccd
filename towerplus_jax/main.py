"""Entry point: `python -m towerplus_jax.main --config=configs/sft.py:tiny --workdir=DIR [--config.KEY=VALUE ...]`.

The config is locked: a misspelt `--config.key` fails at start-up. A config with `stages` (configs/tower_plus.py)
runs its stages in order, each in WORKDIR/<stage>, each initialised from the previous stage's checkpoint.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

def _define_flags() -> dict:
  """CLI flags, defined only when run as a program, so that importing `run` defines none."""
  defined = {"config": config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/sft.py:tiny.",
                                                       lock_config=True),
             "workdir": flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).")}
  flags.mark_flags_as_required(["config", "workdir"])
  return defined


def run(config, workdir: str) -> dict:
  """Check every stage's values, then train the stage, or each stage of a chain in order."""
  from towerplus_jax import config_check, distributed, run_lock
  config_check.check(config)
  distributed.initialize()
  with run_lock.hold(workdir):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> dict:
  from towerplus_jax import train
  if "stages" not in config:
    return train.train(config, workdir)
  results, previous = {}, None
  for name in config.stage_order:
    stage = config.stages[name]
    if stage.init_from == "previous":
      with stage.unlocked():
        stage.init_from = f"ckpt:{os.path.join(workdir, previous)}" if previous else ""
    logging.info("=== stage %s ===", name)
    stage_dir = os.path.join(workdir, name)
    results[name] = train.train(stage, stage_dir)
    if config.eval_data:
      results[name].update(_held_out_scores(config, stage_dir))
      logging.info("stage %s held-out: chrF %.2f BLEU %.2f", name, results[name]["heldout/chrf"],
                   results[name]["heldout/bleu"])
    previous = name
  return results


def _held_out_scores(config, stage_dir: str) -> dict[str, float]:
  from towerplus_jax import evaluate, setup_run
  from towerplus_jax.data import records as records_lib, sources
  records = records_lib.read_all(sources.open_source(setup_run.resolve_sources(config.eval_data)), "test")
  model, tokenizer, template = evaluate.load(stage_dir)
  report = evaluate.evaluate(model, tokenizer, template, records, os.path.join(stage_dir, "eval"),
                             max_new_tokens=config.eval_max_new_tokens)
  return {f"heldout/{k}": report["overall"][k] for k in ("chrf", "bleu")}


def _quiet_libraries() -> None:
  """Orbax and grain log every checkpoint step at INFO through absl; keep their warnings, drop the chatter."""
  import logging as pylogging
  noisy = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}etils{os.sep}")

  class Filter(pylogging.Filter):
    def filter(self, record):
      return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in noisy)
  logging.get_absl_handler().addFilter(Filter())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  _quiet_libraries()
  results = run(_F["config"].value, _F["workdir"].value)
  logging.info("done: %s", json.dumps(results, default=float)[:2000])


if __name__ == "__main__":
  _F = _define_flags()
  app.run(main)
