"""Entry point: `python -m towerplus_jax.main --config=configs/sft.py:tiny --workdir=DIR [--config.KEY=VALUE ...]`.

The config is locked: a misspelt `--config.key` fails at start-up. A config with `stages` (configs/tower_plus.py)
runs its stages in order, each in WORKDIR/<stage>, each initialised from the previous stage's checkpoint.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Sequence

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

# Each stage's own objective (by its loss's batch format): the summary shows how it moved from the start to the end
# of training.
TREND_KEYS = {"lm": ("loss",), "sft": ("loss",), "preference": ("loss", "rewards/accuracies", "rewards/margins"),
              "rl": ("reward/mean",)}


def _define_flags() -> dict:
  """CLI flags, defined only when run as a program, so that importing `run` defines none."""
  defined = {"config": config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/sft.py:tiny.",
                                                       lock_config=True),
             "workdir": flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).")}
  flags.mark_flags_as_required(["config", "workdir"])
  return defined


BAD_INPUT = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)


def run(config, workdir: str) -> dict:
  """Check every stage's values, then train the stage, or each stage of a chain in order. A workdir this call
  created is removed again when bad input stops the run before any checkpoint was saved (nothing half-made is left);
  an existing one is never touched before the run is known to be valid (see setup_run)."""
  import jax

  from towerplus_jax import config_check, distributed, run_lock
  config_check.check(config)
  distributed.initialize()
  folder = epath.Path(workdir)
  if folder.exists() and not folder.is_dir():
    raise NotADirectoryError(f"--workdir={workdir} is an existing file, not a run folder: choose another --workdir")
  new = not folder.exists()
  try:
    with run_lock.hold(workdir):
      return _run_locked(config, workdir)
  except BAD_INPUT:
    if new and jax.process_index() == 0 and folder.exists() and not _has_checkpoints(folder):
      folder.rmtree()
    raise


def _has_checkpoints(folder: epath.Path) -> bool:
  """Whether a run folder (or a chain's stage folder in it) holds a saved checkpoint step."""
  for steps in (folder / "checkpoints", *(p / "checkpoints" for p in folder.iterdir() if p.is_dir())):
    if steps.is_dir() and any(p.name.split(".")[0].isdigit() for p in steps.iterdir()):
      return True
  return False


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
      scores = _held_out_scores(config, stage_dir)
      results[name].update(scores)
      _append_metrics(stage_dir, stage.train.steps, scores)
      logging.info("stage %s held-out: chrF %.2f BLEU %.2f", name, results[name]["heldout/chrf"],
                   results[name]["heldout/bleu"])
    previous = name
  return results


def _held_out_scores(config, stage_dir: str) -> dict[str, float]:
  from towerplus_jax import evaluate
  from towerplus_jax.data import records as records_lib, sources
  records = records_lib.read_all(sources.open_source(sources.resolve_sources(config.eval_data)), "test")
  model, tokenizer, template = evaluate.load(stage_dir)
  report = evaluate.evaluate(model, tokenizer, template, records, os.path.join(stage_dir, "eval"),
                             max_new_tokens=config.eval_max_new_tokens)
  return {f"heldout/{k}": report["overall"][k] for k in ("chrf", "bleu")}


def _check_names(config) -> None:
  """Every stage's preset / init_from resolves, or one line and exit before anything is written (`run` then checks
  the values)."""
  from towerplus_jax import config_check
  try:
    for stage in config.stages.values() if "stages" in config else [config]:
      config_check.check_names(stage)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def _append_metrics(workdir: str, step: int, metrics: dict[str, float]) -> None:
  """End-of-stage scores into the stage's metrics.jsonl and TensorBoard, next to its training metrics."""
  from towerplus_jax.metrics_writer import MetricsWriter
  writer = MetricsWriter(workdir, step, 0.0)
  writer.write(step, metrics)
  writer.close()


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
  from towerplus_jax import losses
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


def quiet_libraries() -> None:
  """Orbax and grain log every checkpoint step at INFO through absl, and Orbax warns that a restore-only manager is
  read-only; keep their other warnings, drop the chatter. A failed save (reported as one `error:` line) makes Orbax
  log each failing thread's traceback, and its other threads then fail on a closed event loop: keep the first line
  of each error (tracebacks with --verbosity=1), drop the follow-on failures."""
  import logging as pylogging
  noisy = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}etils{os.sep}")
  follow_on = ("cannot schedule new futures after", "Event loop is closed")

  class Filter(pylogging.Filter):
    def filter(self, record):
      if not any(n in record.pathname for n in noisy):
        return True
      msg = record.getMessage()
      if record.levelno >= pylogging.ERROR and logging.get_verbosity() < logging.DEBUG:
        record.exc_info = record.exc_text = None
        return not any(f in msg for f in follow_on)
      return record.levelno >= pylogging.WARNING and "read_only" not in msg and "read only" not in msg
  logging.get_absl_handler().addFilter(Filter())


def main(argv):
  import jax

  from towerplus_jax import checkpoint
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if logging.get_verbosity() < logging.INFO:  # progress lines by default; --verbosity=1 (tracebacks) stays
    logging.set_verbosity(logging.INFO)
  quiet_libraries()
  _check_names(_F["config"].value)
  try:
    with one_line_errors():
      results = run(_F["config"].value, _F["workdir"].value)
  except checkpoint.SaveFailed as e:
    logging.debug("traceback of the error below", exc_info=True)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # at once: Orbax's abandoned writes of the failed save (into a temporary folder that the rerun
    # removes) would fail on its closed event loop during interpreter exit, burying this line under tracebacks
  except checkpoint.Stopped as e:  # non-zero, so that a launcher retrying on failure resumes the run
    logging.warning("%s", e)
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  if jax.process_index() == 0:
    print(summary(results, _F["workdir"].value, _F["config"].value), flush=True)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Bad input (config value, data, tokenizer, checkpoint, HF or run folder, a busy workdir) raised inside: exit with
  one `error:` line; the traceback only with --verbosity=1. The CLIs' boundary (main, reference, evaluate)."""
  from towerplus_jax import run_lock
  try:
    yield
  except (run_lock.WorkdirBusy, *BAD_INPUT) as e:
    logging.debug("traceback of the error below", exc_info=True)
    raise SystemExit(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]} (traceback: rerun with "
                     "--verbosity=1)") from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad flag (misspelt, missing) or config (no such file, unknown preset, misspelt `--config.*`
  key, bad value) exits with one line, before any file is written."""
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    root = e
    while root.__cause__ or root.__context__:  # the config file's own error, under absl's wrappers
      root = root.__cause__ or root.__context__
    if isinstance(root, OSError) and "config file" in str(root):
      _missing_config_file(argv)
    if not isinstance(root, (AttributeError, KeyError, ValueError)):
      if isinstance(e, flags.Error):  # e.g. a misspelt flag: absl's own message names it and the closest
        raise SystemExit(f"error: {str(e).splitlines()[0]} (flags: --helpshort)") from None
      raise
    raise SystemExit(f"error: {_config_error(argv, e, root)}") from None
  if "config" in flags.FLAGS and type(flags.FLAGS["config"].value).__name__ == "_ErrorConfig":
    _missing_config_file(argv)  # ml_collections defers the error of a file it could not load to the first access
  return rest


def _missing_config_file(argv: list[str]) -> None:
  config_arg = next((a.split("=", 1)[1] for a in argv if a.lstrip("-").startswith("config=")), "")
  path = config_arg.partition(":")[0]
  problem = f"cannot read config file {path}" if os.path.exists(path) else f"no config file {path}"
  raise SystemExit(f"error: --config={config_arg}: {problem} (paths are relative to {os.getcwd()}); e.g. "
                   "--config=configs/sft.py:tiny") from None



def _config_error(argv: list[str], error: Exception, root: Exception) -> str:
  """One line: the config file's own error, a bad flag value, or for a misspelt `--config.*` override the config
  keys closest to it."""
  if isinstance(root, ValueError):
    return str(root) if "Error whilst parsing config file" in str(error) else str(error).splitlines()[0]
  config_arg = next((a.split("=", 1)[1] for a in argv if a.lstrip("-").startswith("config=")), "")
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("towerplus_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  keys = _leaf_keys(module.get_config(*filter(None, [arg])))
  for a in argv:
    key = a.lstrip("-").split("=", 1)[0].removeprefix("config.")
    if a.lstrip("-").startswith("config.") and not any(k == key or k.startswith(key + ".") for k in keys):
      leaves = {k: k.rsplit(".", 1)[-1] for k in keys}
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6) or [
          k for k, leaf in leaves.items() if leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves.values())]
      hint = f"; did you mean {' or '.join('--config.' + k for k in close[:3])}?" if close else ""
      return f"--config.{key}: no such key in {config_arg}{hint}"
  return str(error).splitlines()[0]


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted paths of every non-section key."""
  out = []
  for k, v in config.items():
    out.extend(_leaf_keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [prefix + k])
  return out


if __name__ == "__main__":
  _F = _define_flags()
  app.run(main, flags_parser=parse_flags)
