"""Companion of tools/make_comet_fixture.py (run it first, in the same side environment with the REAL unbabel-comet
2.2.7): adds to tests/data/comet

  unified_word/    UnifiedMetric with its word-level tagger (word_level_training: true, error labels minor/major,
                   softmax mix with layer norm, tags read from hidden state 1) on encoder/
  edge_scores.json triples whose texts hold the tokenizer's special tokens as literal text (<pad> in src, mt, ref,
                   several in a row, one past the truncation point; </s>, <s>, <unk>, <mask>), and the real
                   package's scores for them (regression, unified, unified_xl, xcomet, unified_word; with and without
                   references where the model can), xcomet's and unified_word's error spans, and unified_word's
                   scores and error spans on scores.json's triples

  /work/comet_venv/bin/python tools/make_comet_edge_fixture.py   # ~20 s on 2 cores
"""
from __future__ import annotations

import json
import os
import sys

import torch
from comet import load_from_checkpoint
from comet.models import UnifiedMetric

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "comet")  # the fixtures
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_comet_fixture import HEAD_COMMON, _perturb, save_checkpoint  # noqa: E402

TOWN = "A estação de comboios fica perto do centro da cidade."
LONG = " ".join([TOWN, "El autobús a la playa sale a las diez.", "Der Zug nach Hamburg hat zehn Minuten Verspätung."])
EDGE_TRIPLES = [
    {"src": "The train station is near the city centre.", "mt": "A estação <pad> de comboios fica perto do centro.",
     "ref": TOWN},
    {"src": "The bus to the <pad> beach leaves at ten.", "mt": "El autobús a la playa sale a diez.",
     "ref": "El autobús a la playa sale a las diez."},
    {"src": "The train to Hamburg is ten minutes late.", "mt": "Der Zug nach Hamburg hat zehn Minuten Verspätung.",
     "ref": "Der Zug <pad> nach Hamburg hat <pad> zehn Minuten Verspätung."},
    {"src": "The train to Venice is on time.", "mt": "<pad><pad><pad>", "ref": "Il treno per Venezia è in orario."},
    {"src": "The train to Venice is on time.", "mt": "<pad>", "ref": "Il treno per Venezia è in orario."},
    {"src": "<pad> It will rain <pad>", "mt": "<pad> Vai chover no sábado <pad> à tarde. <pad>",
     "ref": "<pad>Vai chover no sábado à tarde.<pad>"},
    {"src": "The train to Venice is on time.", "mt": "Il treno </s> per Venezia è in orario.",
     "ref": "Il treno per Venezia è in orario."},
    {"src": "I would like a glass of milk, please.", "mt": "<s>Queria um copo de leite, por favor.",
     "ref": "Queria um copo de leite, por favor."},
    {"src": "It will snow in the <unk> tomorrow.", "mt": "Il neigera dans les Alpes demain.",
     "ref": "Il neigera dans les <mask> demain."},
    {"src": "The bus to the beach leaves at ten.", "mt": LONG.replace("sale a las", "sale <pad> a las") + " <pad>",
     "ref": "El autobús a la playa sale a las diez."},
    {"src": "It will rain in Rome on Friday.", "mt": "Venerdì <mask> pioverà a Roma.",
     "ref": "Venerdì pioverà a Roma."},
    {"src": "It is cold and windy this morning.", "mt": "Esta mañana hace frío viento.",
     "ref": "Esta mañana hace frío y viento."},
]


def predict(folder: str, data: list[dict]) -> dict:
  """Segment and system scores, and metadata.error_spans where the model has a word-level tagger."""
  cwd = os.getcwd()
  os.chdir(folder)  # hparams' pretrained_model is a path relative to the model folder
  try:
    pred = load_from_checkpoint(os.path.join(folder, "checkpoints", "model.ckpt")).predict(
        data, batch_size=8, gpus=0, progress_bar=False)
  finally:
    os.chdir(cwd)
  out = {"scores": [float(s) for s in pred.scores], "system_score": float(pred.system_score)}
  if "error_spans" in pred.get("metadata", {}):
    out["error_spans"] = [[{**span, "confidence": float(span["confidence"])} for span in spans]
                          for spans in pred.metadata.error_spans]
  return out


def main() -> None:
  torch.manual_seed(0)
  folder = os.path.join(HERE, "unified_word")
  cwd = os.getcwd()
  os.makedirs(folder, exist_ok=True)
  os.chdir(folder)  # pretrained_model ../encoder resolves from the working directory
  try:
    model = UnifiedMetric(layer_transformation="softmax", layer_norm=True, sent_layer="mix", word_layer=1,
                          input_segments=["mt", "src", "ref"], final_activation=None, word_level_training=True,
                          error_labels=["minor", "major"], **HEAD_COMMON)
  finally:
    os.chdir(cwd)
  _perturb(model, 7)
  save_checkpoint(model, folder)
  with open(os.path.join(HERE, "scores.json"), encoding="utf-8") as f:
    main_triples = json.load(f)["triples"]
  noref = lambda data: [{"src": d["src"], "mt": d["mt"]} for d in data]
  result = {"triples": EDGE_TRIPLES}
  for name in ("regression", "unified", "unified_xl", "xcomet", "unified_word"):
    result[name] = predict(os.path.join(HERE, name), EDGE_TRIPLES)
    if name != "regression":
      result[f"{name}_noref"] = predict(os.path.join(HERE, name), noref(EDGE_TRIPLES))
  result["unified_word_main"] = predict(folder, main_triples)
  result["unified_word_main_noref"] = predict(folder, noref(main_triples))
  with open(os.path.join(HERE, "edge_scores.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  print(json.dumps({k: v["system_score"] for k, v in result.items() if isinstance(v, dict)}))


if __name__ == "__main__":
  main()
