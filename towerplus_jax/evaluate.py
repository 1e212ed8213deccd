"""Translation evaluation of a run's checkpoint or a Hugging Face folder.

  python -m towerplus_jax.evaluate --workdir=DIR --data=test.jsonl [--step=N] [--out=DIR]
  python -m towerplus_jax.evaluate --hf=HF_DIR --data=test.jsonl --comet_model=/models/wmt22-comet-da

Lines are {"source", "reference", "src_lang", "tgt_lang" (language names), "src"?, "tgt"? (codes), "rules"?}.
Each source goes through the Tower+ prompt (plus its IF-MT rules as instructions) and the chat template, decoded
greedily (or sampled); reported: corpus BLEU, chrF, chrF++ with sacrebleu signatures, overall and per language
pair, COMET (system, per pair and per segment, with towerplus_jax.comet from a local COMET folder) when
--comet_model is given, and IF-MT rule adherence. Writes hypotheses.jsonl and report.json.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
from absl import app, flags, logging
from etils import epath
from flax import nnx

from towerplus_jax import comet, ifmt_rules, mt_metrics, sharding, weights
from towerplus_jax.convert import hf
from towerplus_jax.data import chat, derive, sources, tokenizer_files
from towerplus_jax.data import records as records_lib
from towerplus_jax.models import config as model_config
from towerplus_jax.rl import sampler


def load(workdir: str | None = None, hf_dir: str | None = None, step: int | None = None, mesh=None):
  """(model, tokenizer, template) from a run folder's checkpoint or an HF folder."""
  mesh = mesh or sharding.make_mesh({"fsdp": -1})
  if hf_dir:
    cfg, model = hf.load_hf(hf_dir, mesh=mesh)
    folder = hf_dir
  else:
    cfg = model_config.load_json(workdir)
    model = weights.restore_model(cfg, mesh, os.path.join(workdir, "checkpoints"), step)
    folder = os.path.join(workdir, "tokenizer")
  # The template the run trained with (saved with its tokenizer), else the family's.
  return model, tokenizer_files.tokenizer_in(folder), tokenizer_files.template_in(folder) or chat.family_template(cfg.family)


def translate(model: nnx.Module, tokenizer, template: str, records: Sequence[dict], *, max_new_tokens: int = 256,
              batch_size: int = 16, greedy: bool = True, temperature: float = 1.0, seed: int = 0) -> list[str]:
  prompts = [chat.translation_request(r) for r in records]
  hyps = sampler.generate_text(model, tokenizer, template, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, greedy=greedy, temperature=temperature, seed=seed)
  return [h.strip() for h in hyps]


def score(records: Sequence[dict], hyps: Sequence[str], comet_model: str | None = None) -> dict:
  """Corpus metrics overall and per language pair, rule adherence, optional COMET."""
  refs = [r["reference"] for r in records]
  pairs = [f"{_code(r, 'src')}-{_code(r, 'tgt')}" for r in records]
  targets = {p.split("-", 1)[1] for p in pairs}
  report = {"num_segments": len(records),
            "by_pair": mt_metrics.scores_by_pair(hyps, refs, pairs)}
  # One tokenizer for the whole corpus: the target's when there is one target language, else 13a.
  report["overall"] = mt_metrics.corpus_scores(hyps, refs, targets.pop() if len(targets) == 1 else "en")
  with_rules = [(r, h) for r, h in zip(records, hyps) if r.get("rules")]
  if with_rules:
    report["rule_adherence"] = sum(ifmt_rules.rule_adherence(r["rules"], h, r["source"]) for r, h in with_rules) / len(
        with_rules)
  if comet_model:
    seg = comet.cached(comet_model).segment_scores([r["source"] for r in records], hyps, refs)
    report["comet"], report["comet_segments"] = float(seg.mean()), [float(s) for s in seg]
    for pair, scores in report["by_pair"].items():
      scores["comet"] = float(seg[[i for i, p in enumerate(pairs) if p == pair]].mean())
  return report


def _code(record: dict, side: str) -> str:
  return record.get(side) or mt_metrics.lang_code(record[f"{side}_lang"])


def evaluate(model, tokenizer, template: str, records: Sequence[dict], out_dir: str | None = None,
             comet_model: str | None = None, **decode) -> dict:
  hyps = translate(model, tokenizer, template, records, **decode)
  report = score(records, hyps, comet_model)
  if out_dir and jax.process_index() == 0:
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hypotheses.jsonl").write_text(derive.render({**r, "hypothesis": h} for r, h in zip(records, hyps)),
                                          encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
  return report


def _define_flags() -> dict:
  """CLI flags, defined only when run as a program (main.py imports this module and has its own flags)."""
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


def main(argv):
  del argv
  from towerplus_jax.main import quiet_libraries
  quiet_libraries()
  if bool(_F["workdir"].value) == bool(_F["hf"].value):
    raise app.UsageError("give exactly one of --workdir or --hf")
  if not _F["data"].value:
    raise app.UsageError("--data is required")
  try:
    records = records_lib.read_all(sources.open_source(sources.resolve_sources(_F["data"].value)), "test")
    if _F["comet"].value:
      comet.cached(_F["comet"].value)  # a bad COMET folder fails before decoding
  except (ValueError, FileNotFoundError, IsADirectoryError) as e:
    # a missing data file, bad test records or COMET folder: one line naming the file, before loading the model
    raise SystemExit(f"error: {e}") from None
  from towerplus_jax.main import one_line_errors
  with one_line_errors():  # a missing / damaged run or HF folder
    model, tokenizer, template = load(_F["workdir"].value, _F["hf"].value, _F["step"].value)
  out = _F["out"].value or os.path.join(_F["workdir"].value or ".", "eval")
  report = evaluate(model, tokenizer, _F["template"].value or template, records, out, _F["comet"].value,
                    max_new_tokens=_F["max_new"].value, batch_size=_F["batch"].value, greedy=not _F["sample"].value,
                    temperature=_F["temperature"].value)
  overall = report["overall"]
  for name in ("bleu", "chrf", "chrf++"):
    print(f"{name:7s} {overall[name]:6.2f}  {overall[name + '_signature']}")
  if "rule_adherence" in report:
    print(f"rule adherence {report['rule_adherence']:.3f}")
  if "comet" in report:
    print(f"comet   {report['comet']:.4f}")
  logging.info("wrote %s", out)


if __name__ == "__main__":
  _F = _define_flags()
  app.run(main)
