"""The command-line boundary every CLI shares: one `error: ...` line (exit 2) for bad input, flag parsing that
turns absl/ml_collections failures into such a line, and quieter library logging.

Bad input is a config value, a data file, a tokenizer, a checkpoint, an HF or run folder, a busy workdir: the user
can fix it. Tracebacks only with `--verbosity=1`.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import ml_collections
from absl import flags, logging

BAD_INPUT = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)


class Failed(SystemExit):
  """Bad input stopped a CLI: its `error: ...` line is on stderr already; exit status 2."""

  def __init__(self, line: str):
    super().__init__(2)
    self.line = line

  def __str__(self) -> str:
    return self.line


def fail(message: str) -> NoReturn:
  """Print `error: <first line of message>` to stderr and exit with status 2."""
  line = f"error: {(message.strip().splitlines() or ['bad input'])[0]}"
  print(line, file=sys.stderr, flush=True)
  raise Failed(line)


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


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """Bad input (config value, data, tokenizer, checkpoint, HF or run folder, a busy workdir) raised inside: exit with
  one `error:` line; the traceback only with --verbosity=1. The CLIs' boundary (main, reference, evaluate)."""
  from towerplus_jax.files import run_lock
  try:
    yield
  except (run_lock.WorkdirBusy, *BAD_INPUT) as e:
    logging.debug("traceback of the error below", exc_info=True)
    fail(f"{(str(e).strip().splitlines() or [type(e).__name__])[0]} (traceback: rerun with --verbosity=1)")


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
        fail(f"{str(e).splitlines()[0]} (flags: --helpshort)")
      raise
    fail(_config_error(argv, e, root))
  if "config" in flags.FLAGS and type(flags.FLAGS["config"].value).__name__ == "_ErrorConfig":
    _missing_config_file(argv)  # ml_collections defers the error of a file it could not load to the first access
  return rest


def _missing_config_file(argv: list[str]) -> None:
  config_arg = next((a.split("=", 1)[1] for a in argv if a.lstrip("-").startswith("config=")), "")
  path = config_arg.partition(":")[0]
  problem = f"cannot read config file {path}" if os.path.exists(path) else f"no config file {path}"
  fail(f"--config={config_arg}: {problem} (paths are relative to {os.getcwd()}); e.g. --config=configs/sft.py:tiny")



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
