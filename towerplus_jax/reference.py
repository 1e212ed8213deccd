"""Reference log-probs computed once over a preference set, so WPO/DPO can train with no reference model in memory.

  python -m towerplus_jax.reference --config=configs/wpo.py:tiny --workdir=/tmp/ref --out=/tmp/prefs_ref.jsonl \
      --config.init_from=ckpt:/tmp/sft
  python -m towerplus_jax.main --config=configs/wpo.py:tiny --workdir=/tmp/wpo --config.init_from=ckpt:/tmp/sft \
      --config.data.train=/tmp/prefs_ref.jsonl --config.data.precomputed_reference=True

The reference is the model of `config.init_from` (the policy WPO starts from). Each record of `config.data.train`
is written back with `ref_chosen_logp` / `ref_rejected_logp` (summed response log-probs, as the loss uses them).
Single process; the output file appears only when complete.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from towerplus_jax import errors, losses, sharding
from towerplus_jax.config import config_check
from towerplus_jax.convert import tokenizer_files
from towerplus_jax.data import pipeline, sources
from towerplus_jax.run import datasets
from towerplus_jax.training import weights


def precompute(config: ml_collections.ConfigDict, workdir: str, out_path: str) -> int:
  """Write the records of config.data.train with reference log-probs to `out_path`; returns the record count."""
  if jax.process_count() > 1:
    raise RuntimeError("towerplus_jax.reference runs on one process")
  loss = losses.get(config.loss.name)
  if loss.reference_fn is None or loss.batch_format.name != "preference":
    with_reference = [n for n in losses.names() if losses.get(n).reference_fn is not None
                      and losses.get(n).batch_format.name == "preference"]
    raise ValueError(f"config.loss.name={config.loss.name!r} has no reference log-probs to precompute; use a "
                     f"config of one of {', '.join(with_reference)} (e.g. configs/wpo.py)")
  out_dir = os.path.dirname(os.path.abspath(out_path))
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f"--out={out_path}: folder {out_dir} does not exist")
  if os.path.isdir(out_path):
    raise IsADirectoryError(f"--out={out_path} is a folder; give the output file's path (e.g. {out_path}/ref.jsonl)")
  datasets.check_data(config)  # preference records, before the model loads
  mesh = sharding.make_mesh(dict(config.mesh))
  tokenizer = tokenizer_files.load_for_run(config, workdir)
  _, model = weights.load_model(config, mesh, tokenizer.vocab_size)
  graphdef, params = nnx.split(model)
  reference = jax.jit(lambda p, b: loss.reference_fn(nnx.merge(graphdef, p), b, config.loss))
  records = sources.open_source(sources.resolve_sources(config.data.train))
  batches = datasets.dataset_fn(config, tokenizer)(config.data.train, False, config.train.global_batch_size)
  logps: dict[int, dict[str, float]] = {}
  with jax.set_mesh(mesh):
    for batch in batches:
      out = jax.device_get(reference(params, sharding.shard_local_batch(batch, mesh)))
      index = batch["record_index"].ravel()
      for i in np.flatnonzero(pipeline.pairs_present(batch).ravel()):  # not padding rows / unused slots
        logps[int(index[i])] = {k: float(v.ravel()[i]) for k, v in out.items()}
  if len(logps) != len(records):
    raise RuntimeError(f"computed {len(logps)} of {len(records)} records (are some preference records empty?)")
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in range(len(records)):
      f.write(json.dumps({**records[i], **logps[i]}, ensure_ascii=False) + "\n")
  os.replace(tmp, out_path)
  return len(records)


_F: dict = {}


def _define_flags() -> dict:
  """The flags, defined only when run as a program."""
  flags_ = {"config": config_flags.DEFINE_config_file("config", None, "Preference stage config (configs/wpo.py:...).",
                                                      lock_config=True),
            "workdir": flags.DEFINE_string("workdir", None, "Scratch folder (tokenizer copy)."),
            "out": flags.DEFINE_string("out", None, "Output JSONL.")}
  flags.mark_flags_as_required(["config", "workdir", "out"])
  return flags_


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {argv[1:]}")
  errors.quiet_libraries()
  with errors.one_line_errors():
    config_check.check_names(_F["config"].value)
    config_check.check(_F["config"].value)
    n = precompute(_F["config"].value, _F["workdir"].value, _F["out"].value)
  print(f"wrote {n} records with reference log-probs to {_F['out'].value}")


def cli(argv: list[str] | None = None) -> None:
  """The program (`python -m towerplus_jax.reference`, `towerplus reference`); `argv` as sys.argv."""
  global _F
  _F = _define_flags()
  app.run(main, argv=argv, flags_parser=errors.parse_flags)


if __name__ == "__main__":
  cli()
