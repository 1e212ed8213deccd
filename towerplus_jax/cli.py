"""`towerplus`: every command-line program of the package as one command with subcommands.

  towerplus train --config=configs/sft.py:tiny --workdir=/tmp/sft      # python -m towerplus_jax.main
  towerplus aot --config=configs/sft.py:gemma2_9b --topology=v5e-16     # python -m towerplus_jax.aot
  towerplus export --workdir=/tmp/sft --out=/tmp/sft_hf                 # python -m towerplus_jax.convert.hf export
  towerplus import --hf=/models/gemma-2-2b-it --out=/tmp/base           # python -m towerplus_jax.convert.hf import
  towerplus eval --workdir=/tmp/sft --data=sample:test                  # python -m towerplus_jax.evaluate
  towerplus reference --config=configs/wpo.py:tiny --workdir=/tmp/ref --out=/tmp/ref.jsonl

Each subcommand takes its program's flags (`towerplus SUBCOMMAND --help`); bad input is one `error:` line, exit 2.
"""
from __future__ import annotations

import difflib
import importlib
import sys

# subcommand -> (module with `cli(argv)`, whether argv keeps the program name (absl) or not (argparse), help)
COMMANDS = {
    "train": ("towerplus_jax.main", True, "train a stage or the Tower+ chain"),
    "aot": ("towerplus_jax.aot.cli", True, "compile a stage for a TPU slice: memory per chip, does it fit"),
    "export": ("towerplus_jax.convert.hf", False, "a run's checkpoint -> Hugging Face folder"),
    "import": ("towerplus_jax.convert.hf", False, "Hugging Face folder -> a run folder with its weights"),
    "eval": ("towerplus_jax.evaluate.cli", True, "translation scores (BLEU, chrF, COMET) of a run or HF folder"),
    "reference": ("towerplus_jax.reference", True, "reference log-probs of a preference set, computed once"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  return "usage: towerplus SUBCOMMAND [flags]\n" + "\n".join(
      f"  {name:{width}}  {text}" for name, (_, _, text) in COMMANDS.items())


def main(argv: list[str] | None = None) -> None:
  """Dispatch `towerplus SUBCOMMAND ...` to its program."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if argv else 2)
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    print(f"error: no subcommand {name!r}{f'; did you mean {close[0]!r}?' if close else ''}\n{usage()}",
          file=sys.stderr)
    sys.exit(2)
  module, absl_style, _ = COMMANDS[name]
  program = importlib.import_module(module)
  if absl_style:
    program.cli([f"towerplus {name}", *rest])
  else:
    program.cli([name, *rest])


if __name__ == "__main__":
  main()
