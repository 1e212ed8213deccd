"""Train: `python -m towerplus_jax.main --config=configs/sft.py:tiny --workdir=DIR [--config.KEY=VALUE ...]`
(or `towerplus train ...`).

The config is locked: a misspelt `--config.key` fails at start-up with the keys closest to it. A config with `stages`
(configs/tower_plus.py) runs its stages in order (run/chain.py); the run ends with its summary (run/report.py).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from towerplus_jax import errors

_F: dict = {}


def _define_flags() -> None:
  """CLI flags, defined only when run as a program, so that importing this module defines none."""
  _F["config"] = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/sft.py:tiny.",
                                                 lock_config=True)
  _F["workdir"] = flags.DEFINE_string("workdir", None, "Run folder (local path or gs://).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  import jax

  from towerplus_jax.files import checkpoint

  from towerplus_jax.training import preemption
  from towerplus_jax.run import chain, report
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if logging.get_verbosity() < logging.INFO:  # progress lines by default; --verbosity=1 (tracebacks) stays
    logging.set_verbosity(logging.INFO)
  errors.quiet_libraries()
  config, workdir = _F["config"].value, _F["workdir"].value
  try:
    with errors.one_line_errors():
      chain.check_names(config)
      results = chain.run(config, workdir)
  except checkpoint.SaveFailed as e:
    logging.debug("traceback of the error below", exc_info=True)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # at once: Orbax's abandoned writes of the failed save (into a temporary folder that the rerun
    # removes) would fail on its closed event loop during interpreter exit, burying this line under tracebacks
  except preemption.Stopped as e:  # non-zero, so that a launcher retrying on failure resumes the run
    logging.warning("%s", e)
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  if jax.process_index() == 0:
    print(report.summary(results, workdir, config), flush=True)


def cli(argv: list[str] | None = None) -> None:
  """Parse the flags and train; `argv` as sys.argv (program name first)."""
  _define_flags()
  app.run(main, argv=argv, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
