"""Translation evaluation of a run's checkpoint or a Hugging Face folder.

  python -m towerplus_jax.evaluate --workdir=DIR --data=test.jsonl [--step=N] [--out=DIR]
  python -m towerplus_jax.evaluate --hf=HF_DIR --data=test.jsonl --comet_model=/models/wmt22-comet-da

Lines are {"source", "reference", "src_lang", "tgt_lang" (language names), "src"?, "tgt"? (codes), "rules"?}.
Each source goes through the Tower+ prompt (plus its IF-MT rules as instructions) and the chat template, decoded
greedily (or sampled); reported: corpus BLEU, chrF, chrF++ with sacrebleu signatures, overall and per language
pair, COMET (system, per pair and per segment, with towerplus_jax.evaluate.comet from a local COMET folder) when
--comet_model is given, and IF-MT rule adherence. Writes hypotheses.jsonl and report.json.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
from etils import epath
from flax import nnx

from towerplus_jax import sharding
from towerplus_jax.convert import hf, tokenizer_files
from towerplus_jax.data import chat, derive, ifmt_rules
from towerplus_jax.evaluate import comet, mt_metrics, sampler
from towerplus_jax.models import config as model_config
from towerplus_jax.training import weights


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
