"""Run files on cloud storage: every writer and reader goes through epath, tested against a fake gs:// bucket (a
local folder behind epath's backend that, like GCS, cannot append), and nothing lands in a local `gs:` folder."""
import json

import ml_collections
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from towerplus_jax.convert import tokenizer_files
from towerplus_jax.files import storage
from towerplus_jax.models import config as model_config
from towerplus_jax.training import metrics_writer


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... -> tmp_path/bucket/...; yields that folder."""
  root = tmp_path / "gcs"
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else epath sends gs:// to TensorFlow's gfile

  def local(x):
    return str(x).replace("gs://", f"{root}/") if str(x).startswith("gs://") else x

  def fake(original, path, *args, **kwargs):
    if args and isinstance(args[0], str) and "a" in args[0] and str(path).startswith("gs://"):
      raise OSError("object stores cannot append")
    return original(local(path), *[local(a) for a in args], **kwargs)

  names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename", "replace",
           "rmtree", "stat", "walk")
  with epath_testing.mock_epath(**{n: fake for n in names}):
    yield root / "bucket"
  assert not (tmp_path / "gs:").exists()


def test_append_text(bucket):
  storage.append_text("gs://bucket/run/a.jsonl", "1\n")
  storage.append_text("gs://bucket/run/a.jsonl", "2\n")
  assert (bucket / "run" / "a.jsonl").read_text() == "1\n2\n"


def test_run_files_on_the_bucket(bucket):
  cfg = model_config.preset("tiny")
  model_config.save_json(cfg, "gs://bucket/run")
  assert model_config.load_json("gs://bucket/run") == cfg

  config = ml_collections.ConfigDict({"init_from": "", "data": {"tokenizer": "sample", "template": "gemma"}})
  tok = tokenizer_files.load_for_run(config, "gs://bucket/run")
  assert (bucket / "run" / "tokenizer" / "tokenizer.model").exists()
  assert tokenizer_files.tokenizer_in("gs://bucket/run/tokenizer").encode("hello") == tok.encode("hello")

  writer = metrics_writer.MetricsWriter("gs://bucket/run", 10, 1.0)
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.0})
  writer.close()
  rows = [json.loads(line) for line in (bucket / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["loss"] for r in rows] == [2.0, 1.0]
  assert any(p.name.startswith("events.out.tfevents") for p in (bucket / "run" / "tensorboard").iterdir())


def test_hf_export_to_the_bucket(bucket, tmp_path, tiny_hf_model):
  """A run's HF export goes to a gs:// folder (staged locally: safetensors writes files); a second export there is
  refused without --overwrite, and replaces the first with it."""
  from towerplus_jax.convert import hf
  work = tmp_path / "work"
  hf.import_to_workdir(tiny_hf_model("qwen2"), str(work))
  hf.export_workdir(str(work), "gs://bucket/export", dtype="float32")
  names = sorted(p.name for p in (bucket / "export").iterdir())
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(names)
  with pytest.raises(FileExistsError, match="already holds an export"):
    hf.export_workdir(str(work), "gs://bucket/export")
  hf.export_workdir(str(work), "gs://bucket/export", overwrite=True)
  assert sorted(p.name for p in (bucket / "export").iterdir()) == names
  cfg, _ = hf.load_hf(str(bucket / "export"))
  assert cfg.family == "qwen2"
