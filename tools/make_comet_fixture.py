"""Build the tiny COMET fixture in tests/data/comet/ with the REAL unbabel-comet code, and record its scores.

unbabel-comet 2.2.7 pins numpy<2, transformers<5, protobuf<5, huggingface-hub<1, so it lives in a side virtual
environment outside the repository (never in the project's own):

  python -m venv /work/comet_venv
  /work/comet_venv/bin/pip install torch==2.13.0        # first: the CPU wheel (an unpinned torch pulls CUDA)
  /work/comet_venv/bin/pip install unbabel-comet==2.2.7
  # its torchmetrics 0.10 imports pkg_resources (gone from new setuptools); sentencepiece 0.2.1+ needs protobuf>=5
  /work/comet_venv/bin/pip install "setuptools<70" "sentencepiece==0.2.0"
  /work/comet_venv/bin/python tools/make_comet_fixture.py [--out tests/data/comet]   # ~30 s on 2 cores

It writes (all random, seeded, from towerplus_jax/data/sample text; no hub access):
  encoder/      a tiny XLM-RoBERTa: config.json + tokenizer.json (sentencepiece unigram trained here) + tokenizer_config
  encoder_xl/   a tiny XLM-RoBERTa-XL (pre-LN layers, final LayerNorm; the encoder of xCOMET-XL, CometKiwi-XL)
  regression/   RegressionMetric (wmt22-comet-da style: sparsemax layer mix, avg pooling, 6-feature head)
  unified/      UnifiedMetric (CometKiwi / xCOMET style: softmax mix with layer norm, CLS of mt+src[+ref])
  unified_xl/   UnifiedMetric on encoder_xl (CometKiwi-XL style: sparsemax mix, no layer norm)
  xcomet/       XCOMETMetric on encoder_xl (xCOMET-XL style: unified head + token error-span tagger, MQM score)
                each: checkpoints/model.ckpt (a Lightning checkpoint) + hparams.yaml (pretrained_model: ../encoder*)
  scores.json   the triples and the real package's segment and system scores: regression, unified with
                references, unified without references (CometKiwi mode), unified_xl and xcomet with and without
                references (xcomet also its decoded error spans and their MQM score)
Each model is saved, then loaded back with `comet.load_from_checkpoint` (as users do) before scoring.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import pytorch_lightning as ptl
import sentencepiece as spm
import torch
import yaml
from comet import load_from_checkpoint
from comet.models import RegressionMetric, UnifiedMetric, XCOMETMetric
from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast, XLMRobertaXLConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "towerplus_jax", "data", "sample")
MAX_POSITIONS = 40  # encoder max_position_embeddings - 2: sentences are cut at 38 tokens, so truncation is tested
HEAD_COMMON = dict(nr_frozen_epochs=0.0, keep_embeddings_frozen=True, hidden_sizes=[48, 24], activations="Tanh",
                   dropout=0.1, load_pretrained_weights=False, pretrained_model="../encoder")


def _lines(name: str) -> list[dict]:
  with open(os.path.join(SAMPLE, name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def make_encoder(out: str, xl_out: str) -> None:
  """Tiny XLM-R and XLM-R XL configs + a fast tokenizer built from a sentencepiece model trained on the sample
  texts (the same tokenizer in both folders)."""
  texts = [r["source"] for r in _lines("parallel.jsonl")] + [r["reference"] for r in _lines("parallel.jsonl")]
  texts += [r["text"] for r in _lines("mono.jsonl")]
  with tempfile.TemporaryDirectory() as tmp:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=os.path.join(tmp, "sp"),
                                   vocab_size=600, model_type="unigram", character_coverage=0.995,
                                   normalization_rule_name="identity", num_threads=1)
    tok = XLMRobertaTokenizerFast(vocab_file=os.path.join(tmp, "sp.model"))
  sizes = dict(vocab_size=len(tok), num_attention_heads=4, max_position_embeddings=MAX_POSITIONS + 2, pad_token_id=1,
               bos_token_id=0, eos_token_id=2, type_vocab_size=1)
  for folder, config in ((out, XLMRobertaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, **sizes)),
                         (xl_out, XLMRobertaXLConfig(hidden_size=16, num_hidden_layers=3, intermediate_size=32,
                                                     layer_norm_eps=1e-5, **sizes))):
    tok.save_pretrained(folder)
    if os.path.exists(os.path.join(folder, "sentencepiece.bpe.model")):  # tokenizer.json is enough for both sides
      os.remove(os.path.join(folder, "sentencepiece.bpe.model"))
    config.save_pretrained(folder)


def _perturb(model: torch.nn.Module, seed: int) -> None:
  """Random values everywhere (layer norms, biases, the layer mix, gamma), so any missing term shows in scores."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.5 if ("estimator" in name or "layerwise" in name) else 0.1
      p.add_(scale * torch.randn(p.shape, generator=g))


def save_checkpoint(model: ptl.LightningModule, folder: str) -> None:
  """checkpoints/model.ckpt + hparams.yaml, the layout `comet.load_from_checkpoint` reads."""
  os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
  hparams = dict(model.hparams)
  torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
              "pytorch-lightning_version": ptl.__version__, "epoch": 0, "global_step": 0},
             os.path.join(folder, "checkpoints", "model.ckpt"))
  with open(os.path.join(folder, "hparams.yaml"), "w") as f:
    yaml.safe_dump(hparams, f)


def triples() -> list[dict]:
  """~20 multilingual (src, mt, ref): exact, word dropped, words swapped, wrong language, empty, over-long."""
  rows = [r for r in _lines("test.jsonl")]
  picked, seen = [], {}
  for r in rows:
    if seen.get(r["tgt"], 0) < 3:
      seen[r["tgt"]] = seen.get(r["tgt"], 0) + 1
      picked.append(r)
  out = []
  for i, r in enumerate(picked):
    words = r["reference"].split()
    mt = [r["reference"], " ".join(words[:-2] + words[-1:]), " ".join(words[1:2] + words[:1] + words[2:]),
          r["source"]][i % 4]
    out.append({"src": r["source"], "mt": mt, "ref": r["reference"]})
  out.append({"src": picked[0]["source"], "mt": "", "ref": picked[0]["reference"]})
  long = " ".join(r["reference"] for r in picked[:6])
  out.append({"src": picked[1]["source"] + " " + picked[2]["source"], "mt": long, "ref": picked[1]["reference"]})
  return out


def predict(folder: str, data: list[dict]) -> dict:
  cwd = os.getcwd()
  os.chdir(folder)  # hparams' pretrained_model is the relative path ../encoder
  try:
    model = load_from_checkpoint(os.path.join(folder, "checkpoints", "model.ckpt"))
    pred = model.predict(data, batch_size=8, gpus=0, progress_bar=False)
  finally:
    os.chdir(cwd)
  out = {"scores": [float(s) for s in pred.scores], "system_score": float(pred.system_score)}
  if "mqm_scores" in pred.get("metadata", {}):
    out["mqm_scores"] = [float(s) for s in pred.metadata.mqm_scores]
    out["error_spans"] = [[{**span, "confidence": float(span["confidence"])} for span in spans]
                          for spans in pred.metadata.error_spans]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "comet"))
  out = os.path.abspath(parser.parse_args().out)
  torch.manual_seed(0)
  make_encoder(os.path.join(out, "encoder"), os.path.join(out, "encoder_xl"))
  classes = {
      "regression": lambda: RegressionMetric(layer_transformation="sparsemax", layer_norm=False, pool="avg",
                                             final_activation=None, **HEAD_COMMON),
      "unified": lambda: UnifiedMetric(layer_transformation="softmax", layer_norm=True, sent_layer="mix",
                                       input_segments=["mt", "src", "ref"], final_activation="Sigmoid",
                                       **HEAD_COMMON),
      "unified_xl": lambda: UnifiedMetric(layer_transformation="sparsemax", layer_norm=False, sent_layer="mix",
                                          input_segments=["mt", "src", "ref"], final_activation=None,
                                          **dict(HEAD_COMMON, encoder_model="XLM-RoBERTa-XL",
                                                 pretrained_model="../encoder_xl")),
      "xcomet": lambda: XCOMETMetric(word_layer=2, layer_transformation="sparsemax", layer_norm=False,
                                     **dict(HEAD_COMMON, encoder_model="XLM-RoBERTa-XL",
                                            pretrained_model="../encoder_xl")),
  }
  data = triples()
  result = {"triples": data, "max_positions": MAX_POSITIONS}
  cwd = os.getcwd()
  for seed, (name, make) in enumerate(classes.items()):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)  # pretrained_model ../encoder resolves from the working directory
    try:
      model = make()
    finally:
      os.chdir(cwd)
    _perturb(model, seed)
    save_checkpoint(model, folder)
  result["regression"] = predict(os.path.join(out, "regression"), data)
  result["unified"] = predict(os.path.join(out, "unified"), data)
  noref = [{"src": d["src"], "mt": d["mt"]} for d in data]
  result["unified_noref"] = predict(os.path.join(out, "unified"), noref)
  result["unified_xl"] = predict(os.path.join(out, "unified_xl"), data)
  result["unified_xl_noref"] = predict(os.path.join(out, "unified_xl"), noref)
  result["xcomet"] = predict(os.path.join(out, "xcomet"), data)
  result["xcomet_noref"] = predict(os.path.join(out, "xcomet"), noref)
  with open(os.path.join(out, "scores.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  print(json.dumps({k: v["system_score"] for k, v in result.items() if isinstance(v, dict)}))


if __name__ == "__main__":
  main()
