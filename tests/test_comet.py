"""COMET in JAX against the real unbabel-comet: tests/data/comet holds tiny RegressionMetric and UnifiedMetric
checkpoints (XLM-R and XLM-R XL encoders), an XCOMETMetric, and the real package's scores for 26 triples
(tools/make_comet_fixture.py built them)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.evaluate.comet import Comet, CometCheckpointError, scorer

DATA = os.path.join(os.path.dirname(__file__), "data", "comet")
with open(os.path.join(DATA, "scores.json"), encoding="utf-8") as _f:
  FIXTURE = json.load(_f)
TRIPLES = FIXTURE["triples"]
SRC, MT, REF = ([t[k] for t in TRIPLES] for k in ("src", "mt", "ref"))


MODELS_MESH = {"data": 2, "fsdp": 4}


@pytest.fixture(scope="module")
def models():
  """The models on a data × fsdp mesh over the 8 test devices (parameters sharded over fsdp, rows split)."""
  mesh = sharding.make_mesh(MODELS_MESH)
  return {name: Comet.load(os.path.join(DATA, name), mesh=mesh, batch_size=32)
          for name in ("regression", "unified", "unified_xl", "xcomet")}


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


@pytest.mark.parametrize("with_refs,key", [(True, "xcomet"), (False, "xcomet_noref")])
def test_xcomet_error_spans_match_the_real_package(models, with_refs, key):
  """metadata.error_spans of the real XCOMETMetric: text, severity, character offsets equal, confidence to 1e-4."""
  spans = models["xcomet"].score(SRC, MT, REF if with_refs else None)["error_spans"]
  real = FIXTURE[key]["error_spans"]
  assert sum(map(len, real)) > 100
  assert [[{k: v for k, v in s.items() if k != "confidence"} for s in row] for row in spans] == (
      [[{k: v for k, v in s.items() if k != "confidence"} for s in row] for row in real])
  np.testing.assert_allclose([s["confidence"] for row in spans for s in row],
                             [s["confidence"] for row in real for s in row], atol=1e-4)


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
