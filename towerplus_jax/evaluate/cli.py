"""`python -m towerplus_jax.evaluate` (or `towerplus eval`): translation scores of a run's checkpoint or an HF folder.

  python -m towerplus_jax.evaluate --workdir=DIR --data=test.jsonl [--step=N] [--out=DIR]
  python -m towerplus_jax.evaluate --hf=HF_DIR --data=test.jsonl --comet_model=/models/wmt22-comet-da

What is scored and written: translation.py.
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from towerplus_jax import errors
from towerplus_jax.data import records as records_lib
from towerplus_jax.data import sources
from towerplus_jax.evaluate import comet, translation

_F: dict = {}


def _define_flags() -> dict:
  """The flags, defined only when run as a program."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "Run folder to evaluate (latest checkpoint unless --step)."),
      "hf": flags.DEFINE_string("hf", None, "Hugging Face folder to evaluate instead of a run folder."),
      "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: latest)."),
      "data": flags.DEFINE_string("data", None, "Test set JSONL (sample:test for the shipped one)."),
      "out": flags.DEFINE_string("out", None, "Output folder (default WORKDIR/eval or ./eval)."),
      "template": flags.DEFINE_string("template", None, "Chat template (default: gemma for Gemma, chatml for Qwen)."),
      "max_new": flags.DEFINE_integer("max_new_tokens", 256, "Decoding budget per segment."),
      "batch": flags.DEFINE_integer("batch_size", 16, "Segments decoded together."),
      "sample": flags.DEFINE_bool("sample", False, "Sample (with --temperature) instead of greedy decoding."),
      "temperature": flags.DEFINE_float("temperature", 1.0, "Sampling temperature with --sample."),
      "comet": flags.DEFINE_string("comet_model", None, "COMET model folder (checkpoints/model.ckpt + hparams.yaml), "
                                       "e.g. a download of Unbabel/wmt22-comet-da."),
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {argv[1:]}")
  errors.quiet_libraries()
  if bool(_F["workdir"].value) == bool(_F["hf"].value):
    errors.fail("give exactly one of --workdir or --hf")
  if not _F["data"].value:
    errors.fail("--data is required (a test set JSONL, or sample:test)")
  with errors.one_line_errors():
    # a missing data file, bad test records or COMET folder fail before the model loads; then a bad run/HF folder
    records = records_lib.read_all(sources.open_source(sources.resolve_sources(_F["data"].value)), "test")
    if _F["comet"].value:
      comet.cached(_F["comet"].value)
    model, tokenizer, template = translation.load(_F["workdir"].value, _F["hf"].value, _F["step"].value)
  out = _F["out"].value or os.path.join(_F["workdir"].value or ".", "eval")
  report = translation.evaluate(model, tokenizer, _F["template"].value or template, records, out, _F["comet"].value,
                                max_new_tokens=_F["max_new"].value, batch_size=_F["batch"].value,
                                greedy=not _F["sample"].value, temperature=_F["temperature"].value)
  overall = report["overall"]
  for name in ("bleu", "chrf", "chrf++"):
    print(f"{name:7s} {overall[name]:6.2f}  {overall[name + '_signature']}")
  if "rule_adherence" in report:
    print(f"rule adherence {report['rule_adherence']:.3f}")
  if "comet" in report:
    print(f"comet   {report['comet']:.4f}")
  logging.info("wrote %s", out)


def cli(argv: list[str] | None = None) -> None:
  """The program (`python -m towerplus_jax.evaluate`, `towerplus eval`); `argv` as sys.argv (program name first)."""
  global _F
  _F = _define_flags()
  app.run(main, argv=argv, flags_parser=errors.parse_flags)
