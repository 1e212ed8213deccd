"""COMET in JAX against the real unbabel-comet: tests/data/comet holds tiny RegressionMetric and UnifiedMetric
checkpoints (XLM-R and XLM-R XL encoders), an XCOMETMetric, and the real package's scores for 26 triples
(tools/make_comet_fixture.py built them); a UnifiedMetric with its word-level tagger, and the real package's scores
and error spans for triples holding special tokens as literal text (tools/make_comet_edge_fixture.py)."""
import json
import os
import shutil
import zipfile

import jax
import numpy as np
import pytest
import yaml
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.evaluate.comet import Comet, CometCheckpointError, scorer
from towerplus_jax.evaluate.comet.model import HEAD_ACTIVATIONS

DATA = os.path.join(os.path.dirname(__file__), "data", "comet")
with open(os.path.join(DATA, "scores.json"), encoding="utf-8") as _f:
  FIXTURE = json.load(_f)
TRIPLES = FIXTURE["triples"]
SRC, MT, REF = ([t[k] for t in TRIPLES] for k in ("src", "mt", "ref"))
with open(os.path.join(DATA, "edge_scores.json"), encoding="utf-8") as _f:
  EDGE = json.load(_f)


MODELS_MESH = {"data": 2, "fsdp": 4}


@pytest.fixture(scope="module")
def models():
  """The models on a data × fsdp mesh over the 8 test devices (parameters sharded over fsdp, rows split)."""
  mesh = sharding.make_mesh(MODELS_MESH)
  return {name: Comet.load(os.path.join(DATA, name), mesh=mesh, batch_size=32)
          for name in ("regression", "unified", "unified_xl", "xcomet", "unified_word")}


@pytest.mark.parametrize("name,with_refs,key", [
    ("regression", True, "regression"), ("unified", True, "unified"), ("unified", False, "unified_noref"),
    ("unified_xl", True, "unified_xl"), ("unified_xl", False, "unified_xl_noref"),  # XL: pre-LN XLM-R XL encoder
    ("xcomet", True, "xcomet"), ("xcomet", False, "xcomet_noref")])  # XCOMETMetric: regression + error-span MQM
def test_scores_match_the_real_package(models, name, with_refs, key):
  out = models[name].score(SRC, MT, REF if with_refs else None)
  np.testing.assert_allclose(out["segments"], FIXTURE[key]["scores"], atol=1e-4, rtol=0)
  assert abs(out["system"] - FIXTURE[key]["system_score"]) <= 1e-4


@pytest.fixture(scope="module")
def single():
  """The unified and XL models on one device: the reference the sharded meshes must reproduce."""
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  return {name: Comet.load(os.path.join(DATA, name), mesh=mesh, batch_size=32) for name in ("unified", "unified_xl")}


@pytest.mark.parametrize("axes", [{"fsdp": 4, "tensor": 2}, MODELS_MESH])
@pytest.mark.parametrize("name,key", [("unified", "unified"), ("unified_xl", "unified_xl")])
def test_sharded_params_score_as_one_device(models, single, axes, name, key):
  """Parameters sharded by their logical axes (embed over fsdp, vocab/heads/mlp over tensor), loaded straight into
  that layout: the scores equal one device's and the real package's."""
  scorer_ = models[name] if axes == MODELS_MESH else Comet.load(os.path.join(DATA, name),
                                                                mesh=sharding.make_mesh(axes), batch_size=32)
  enc = scorer_._state["encoder"]
  tensor = "tensor" if axes.get("tensor", 1) > 1 else None
  assert enc["word"]["embedding"].get_value().sharding.spec == P(tensor, "fsdp")
  assert enc["layers"][0]["up"]["kernel"].get_value().sharding.spec == P("fsdp", tensor)
  assert enc["layers"][0]["down"]["kernel"].get_value().sharding.spec == P(tensor, "fsdp")
  shard = enc["layers"][0]["up"]["kernel"].get_value().addressable_shards[0].data
  assert shard.size * axes["fsdp"] * axes.get("tensor", 1) == enc["layers"][0]["up"]["kernel"].get_value().size
  out = scorer_.score(SRC, MT, REF)
  np.testing.assert_allclose(out["segments"], single[name].score(SRC, MT, REF)["segments"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out["segments"], FIXTURE[key]["scores"], atol=1e-4, rtol=0)


def test_cached_shards_over_this_process_devices():
  """The evaluate / GRPO-reward model: an fsdp mesh over jax.local_devices(), parameters sharded over it."""
  model = scorer.cached(os.path.join(DATA, "regression"))
  assert model.mesh.devices.size == len(jax.local_devices()) and model.mesh.shape["fsdp"] == len(jax.local_devices())
  assert model._state["encoder"]["layers"][0]["query"]["kernel"].get_value().sharding.spec == P("fsdp", None)
  np.testing.assert_allclose(model.score(SRC, MT, REF)["segments"], FIXTURE["regression"]["scores"], atol=1e-4)


def test_fixture_covers_empty_and_truncated_inputs(models):
  tokens = models["regression"]._tokens(MT)
  assert "" in MT and max(len(t) for t in tokens) == FIXTURE["max_positions"] - 2  # cut at the encoder's limit
  assert len(set(np.round(FIXTURE["regression"]["scores"], 3))) > 20  # scores differ: a wrong term would show


def _spans(tags):
  labels = ("O", "I-minor", "I-major", "I-critical")
  probs_TC = np.eye(4)[[labels.index(t) for t in tags]] * 0.7 + 0.075
  return scorer.error_spans(probs_TC, labels, list(range(len(tags))), [(i, i + 1) for i in range(len(tags))], str)


def test_mqm_score_counts_closed_spans_by_first_severity():
  """As UnifiedMetric.decode: a span's severity is its first token's; a span still open at the end is not counted."""
  spans = _spans(["O", "I-minor", "I-major", "O", "I-major", "O", "I-critical"])
  assert [(s["severity"], s["start"], s["end"], s["text"]) for s in spans] == [("minor", 1, 3, "[1, 2]"),
                                                                                ("major", 4, 5, "[4]")]
  assert scorer.mqm_score(spans) == pytest.approx(19 / 25) and spans[0]["confidence"] == pytest.approx(0.775)
  assert scorer.mqm_score(_spans(["I-critical", "O"] * 3)) == 0.0  # penalty capped at 25
  assert scorer.mqm_score(_spans(["O", "O"])) == 1.0
  mqm = FIXTURE["xcomet"]["mqm_scores"]
  assert 0 < min(m for m in mqm if m > 0) < max(mqm) == 1.0 and 0.0 in mqm  # the fixture exercises spans


def _assert_spans_match(spans: list[list[dict]], real: list[list[dict]]) -> None:
  """Text, severity, character offsets equal; confidence to 1e-4."""
  assert [[{k: v for k, v in s.items() if k != "confidence"} for s in row] for row in spans] == (
      [[{k: v for k, v in s.items() if k != "confidence"} for s in row] for row in real])
  np.testing.assert_allclose([s["confidence"] for row in spans for s in row],
                             [s["confidence"] for row in real for s in row], atol=1e-4)


@pytest.mark.parametrize("with_refs,key", [(True, "xcomet"), (False, "xcomet_noref")])
def test_xcomet_error_spans_match_the_real_package(models, with_refs, key):
  """metadata.error_spans of the real XCOMETMetric."""
  spans = models["xcomet"].score(SRC, MT, REF if with_refs else None)["error_spans"]
  assert sum(map(len, FIXTURE[key]["error_spans"])) > 100
  _assert_spans_match(spans, FIXTURE[key]["error_spans"])


@pytest.mark.parametrize("with_refs,key", [(True, "unified_word_main"), (False, "unified_word_main_noref")])
def test_word_level_unified_metric_returns_the_real_error_spans(models, with_refs, key):
  """UnifiedMetric with word_level_training: its scores (the inputs' mean, no MQM term) and metadata.error_spans
  (UnifiedMetric.decode over the inputs' weighted tag probabilities)."""
  out = models["unified_word"].score(SRC, MT, REF if with_refs else None)
  np.testing.assert_allclose(out["segments"], EDGE[key]["scores"], atol=1e-4, rtol=0)
  assert sum(map(len, EDGE[key]["error_spans"])) > 50
  _assert_spans_match(out["error_spans"], EDGE[key]["error_spans"])
  assert "error_spans" not in models["unified"].score(SRC[:2], MT[:2], REF[:2])  # no tagger, no spans


@pytest.mark.parametrize("name,with_refs,key", [
    ("regression", True, "regression"), ("unified", True, "unified"), ("unified", False, "unified_noref"),
    ("unified_xl", True, "unified_xl"), ("unified_xl", False, "unified_xl_noref"), ("xcomet", True, "xcomet"),
    ("xcomet", False, "xcomet_noref"), ("unified_word", True, "unified_word"),
    ("unified_word", False, "unified_word_noref")])
def test_special_tokens_as_text_match_the_real_package(models, name, with_refs, key):
  """A literal "<pad>" (and </s>, <s>, <unk>, <mask>) in src, mt or ref is its special token's id, attended to as
  COMET does (mask = the first `length` positions, pad ids dropped when inputs are joined); the error spans' ids
  come from the joint input, so they shift against the mt offsets past a dropped "<pad>", as in COMET."""
  triples = EDGE["triples"]
  src, mt, ref = ([t[k] for t in triples] for k in ("src", "mt", "ref"))
  out = models[name].score(src, mt, ref if with_refs else None)
  np.testing.assert_allclose(out["segments"], EDGE[key]["scores"], atol=1e-4, rtol=0)
  if "error_spans" in EDGE[key]:
    _assert_spans_match(out["error_spans"], EDGE[key]["error_spans"])
  # The fixture bites: the real package scores "<pad>" in the source unlike the same triple without it.
  assert src[1].replace(" <pad>", "") == SRC[1] and (mt[1], ref[1]) == (MT[1], REF[1])
  assert abs(EDGE["regression"]["scores"][1] - FIXTURE["regression"]["scores"][1]) > 1e-2


def test_bucketing_and_batch_size_do_not_change_scores(models):
  """Two batches of 13 (other buckets; 13 rows do not divide the 8 devices) and one row alone (filler rows)."""
  full = np.asarray(models["unified"].score(SRC, MT, REF)["segments"])
  small = Comet.load(os.path.join(DATA, "unified"), batch_size=13)
  np.testing.assert_allclose(small.score(SRC, MT, REF)["segments"], full, atol=1e-6)
  one = small.score(SRC[-1:], MT[-1:], REF[-1:])["segments"]
  np.testing.assert_allclose(one, full[-1:], atol=1e-6)


def test_bfloat16_stays_close(models):
  bf16 = Comet.load(os.path.join(DATA, "unified"), batch_size=32, dtype="bfloat16")
  seg = np.asarray(bf16.score(SRC, MT)["segments"])
  assert np.abs(seg - FIXTURE["unified_noref"]["scores"]).max() < 0.02
  assert np.corrcoef(seg, FIXTURE["unified_noref"]["scores"])[0, 1] > 0.9


def test_regression_needs_references(models):
  with pytest.raises(ValueError, match="needs references"):
    models["regression"].score(SRC, MT)


def _copy(tmp_path):
  shutil.copytree(DATA, tmp_path / "comet")
  return tmp_path / "comet"


def test_missing_folder_is_one_clear_line(tmp_path):
  with pytest.raises(CometCheckpointError, match=r"no COMET checkpoint at .*checkpoints/model.ckpt") as e:
    Comet.load(str(tmp_path))
  assert "\n" not in str(e.value)


def test_garbled_checkpoint_is_one_clear_line(tmp_path):
  folder = _copy(tmp_path) / "regression"
  (folder / "checkpoints" / "model.ckpt").write_bytes(b"not a checkpoint")
  with pytest.raises(CometCheckpointError, match=r"model.ckpt: not a readable PyTorch checkpoint") as e:
    Comet.load(str(folder))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,match", [("class_identifier: ranking_metric\n", "not supported"),
                                        ("pool: [avg\n", "invalid YAML"), ("{}\n", "no class_identifier")])
def test_bad_hparams_name_the_file(tmp_path, text, match):
  folder = _copy(tmp_path) / "unified"
  (folder / "hparams.yaml").write_text(text)
  with pytest.raises(CometCheckpointError, match=f"hparams.yaml: .*{match}"):
    Comet.load(str(folder))


def test_missing_encoder_files_say_what_to_copy(tmp_path):
  folder = _copy(tmp_path)
  os.remove(folder / "encoder" / "tokenizer.json")
  with pytest.raises(CometCheckpointError, match="copy the encoder's config.json and tokenizer.json"):
    Comet.load(str(folder / "unified"))


def test_legacy_torch_format_checkpoint_loads(tmp_path):
  """A model.ckpt in torch's legacy (pre-zip) format cannot be memory-mapped: it is read whole, and scores alike."""
  import torch
  folder = _copy(tmp_path) / "unified"
  ckpt = folder / "checkpoints" / "model.ckpt"
  torch.save(torch.load(ckpt, weights_only=True), ckpt, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(ckpt)
  out = Comet.load(str(folder), batch_size=32).score(SRC, MT, REF)
  np.testing.assert_allclose(out["segments"], FIXTURE["unified"]["scores"], atol=1e-4, rtol=0)


_ACTS = "Tanh, Sigmoid, Softplus, Softsign, Hardtanh, Hardsigmoid, Hardswish, Mish, Identity"


@pytest.mark.parametrize("model,changes,message", [
    ("regression", {"pool": "mean"}, "pool='mean' is not supported: must be one of avg, max, cls, default"),
    ("regression", {"pool": "maxx"}, "pool='maxx' is not supported: must be one of avg, max, cls, default; "
                                     "did you mean 'max'?"),
    ("regression", {"layer": 3}, "layer=3 is not supported: must be 'mix' or a hidden-state index 0..2"),
    ("regression", {"layer": "last"}, "layer='last' is not supported: must be 'mix' or a hidden-state index 0..2"),
    ("unified", {"sent_layer": -1}, "sent_layer=-1 is not supported: must be 'mix' or a hidden-state index 0..2"),
    ("unified", {"layer_transformation": "sparsmax"}, "layer_transformation='sparsmax' is not supported: must be "
                                                      "one of softmax, sparsemax, sparsemax_patch; did you mean "
                                                      "'sparsemax'?"),
    ("unified", {"layer_norm": "yes"}, "layer_norm='yes' is not supported: must be true or false"),
    ("unified", {"hidden_sizes": []}, "hidden_sizes=[] is not supported: must be a non-empty list of positive ints"),
    ("unified", {"input_segments": ["mt", "source"]}, "input_segments=['mt', 'source'] is not supported: must be a "
                                                      "list of distinct names among mt, src, ref"),
    ("unified", {"word_level_training": True, "word_layer": 5}, "word_layer=5 is not supported: must be a "
                                                                "hidden-state index 0..2"),
    ("unified", {"word_level_training": True, "word_layer": 1, "error_labels": []},
     "error_labels=[] is not supported: must be a non-empty list of severity names"),
    ("xcomet", {"error_labels": ["minor", "major"]}, "error_labels=['minor', 'major'] is not supported: must be "
                                                     "[minor, major, critical] (XCOMETMetric)"),
    ("unified", {"activations": "ReLU"}, f"activations='ReLU' is not supported: must be one of {_ACTS}"),
    ("regression", {"activations": "tahn"}, f"activations='tahn' is not supported: must be one of {_ACTS}; "
                                            "did you mean 'Tanh'?"),
    ("unified", {"final_activation": "sigmod"}, f"final_activation='sigmod' is not supported: must be one of "
                                                f"{_ACTS}; did you mean 'Sigmoid'?"),
])
def test_bad_hparams_values_are_refused_at_load(tmp_path, model, changes, message):
  """Refused by Comet.load, before any weight is read or text scored: one line naming hparams.yaml, key, value and
  what is allowed."""
  folder = _copy(tmp_path) / model
  with open(folder / "hparams.yaml", encoding="utf-8") as f:
    hparams = yaml.safe_load(f)
  (folder / "hparams.yaml").write_text(yaml.safe_dump({**hparams, **changes}))
  with pytest.raises(CometCheckpointError) as e:
    Comet.load(str(folder))
  assert str(e.value) == f"{folder / 'hparams.yaml'}: {message}"


def test_unknown_encoder_activation_is_refused_at_load(tmp_path):
  folder = _copy(tmp_path)
  config = json.loads((folder / "encoder" / "config.json").read_text())
  (folder / "encoder" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_fast"}))
  with pytest.raises(CometCheckpointError) as e:
    Comet.load(str(folder / "regression"))
  assert str(e.value) == (f"{folder / 'encoder' / 'config.json'}: hidden_act='gelu_fast' is not supported: must be "
                          "one of gelu, relu, silu, tanh, sigmoid; did you mean 'gelu'?")


def test_head_activations_are_torch_nn_by_comet_name():
  """Each estimator activation is the torch.nn class COMET's FeedForward.build_activation builds
  (getattr(torch.nn, name.title())); names it cannot build ("ReLU" -> "Relu") are refused by both."""
  import torch
  x = np.linspace(-25, 25, 1001, dtype=np.float32)
  for name, fn in HEAD_ACTIVATIONS.items():
    assert name == name.title()
    np.testing.assert_allclose(np.asarray(fn(x)), getattr(torch.nn, name)()(torch.from_numpy(x)).numpy(),
                               rtol=1e-6, atol=1e-6, err_msg=name)
  assert not hasattr(torch.nn, "ReLU".title())
