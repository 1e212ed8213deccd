"""Record sources: JSONL (line numbers in errors), ArrayRecord, TFDS and seqio adapters, spec dispatch."""
import json

import numpy as np
import pytest

from towerplus_jax.data import sources

RECORDS = [{"text": f"doc {i}", "n": i} for i in range(5)]


def write_jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_jsonl_reads_records_and_skips_blank_lines(tmp_path):
  lines = [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1]), "   ", json.dumps(RECORDS[2], ensure_ascii=False)]
  path = write_jsonl(tmp_path / "a.jsonl", lines)
  src = sources.open_source(path)
  assert len(src) == 3
  assert [src[i] for i in range(3)] == RECORDS[:3]
  assert [src.locate(i) for i in range(3)] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_jsonl_without_final_newline_and_unicode(tmp_path):
  path = tmp_path / "b.jsonl"
  path.write_text(json.dumps({"text": "Olá 你好"}, ensure_ascii=False) + "\n" + json.dumps({"text": "x"}),
                  encoding="utf-8")
  src = sources.JsonlSource(str(path))
  assert [src[0], src[1]] == [{"text": "Olá 你好"}, {"text": "x"}]
  assert len(sources.JsonlSource(write_jsonl(tmp_path / "empty.jsonl", []))) == 0


def test_jsonl_bad_line_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), "", "{not json", "[1, 2]"])
  src = sources.open_source(path)
  assert src[0] == RECORDS[0]
  with pytest.raises(ValueError, match=rf"{path}:3: invalid JSON"):
    src[1]
  with pytest.raises(ValueError, match=rf"{path}:4: expected a JSON object"):
    src[2]


def test_globs_and_lists_concatenate_in_order(tmp_path):
  for name, recs in (("b.jsonl", RECORDS[2:]), ("a.jsonl", RECORDS[:2])):
    write_jsonl(tmp_path / name, [json.dumps(r) for r in recs])
  src = sources.open_source(str(tmp_path / "*.jsonl"))
  assert [src[i] for i in range(len(src))] == RECORDS
  assert src.locate(2) == f"{tmp_path / 'b.jsonl'}:1"
  both = sources.open_source([str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")])
  assert [both[i] for i in range(len(both))] == RECORDS[2:] + RECORDS[:2]
  with pytest.raises(IndexError):
    both[len(RECORDS)]


def test_missing_and_unknown_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    sources.open_source(str(tmp_path / "nope.jsonl"))
  with pytest.raises(FileNotFoundError, match="no data file matches"):
    sources.open_source(str(tmp_path / "*.jsonl"))
  (tmp_path / "x.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="unknown data format"):
    sources.open_source(str(tmp_path / "x.csv"))


def test_array_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  path = str(tmp_path / "data.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for r in RECORDS:
    writer.write(json.dumps(r).encode())
  writer.write(b"\xff not json")
  writer.close()
  src = sources.open_source(path)
  assert len(src) == len(RECORDS) + 1
  assert [src[i] for i in range(len(RECORDS))] == RECORDS
  with pytest.raises(ValueError, match=r"data.array_record\[record 5\]: invalid JSON"):
    src[5]


def test_to_python_converts_tfds_values():
  value = {"text": b"caf\xc3\xa9", "score": np.float32(0.5), "ids": np.array([1, 2], np.int64),
           "messages": {"role": [b"user", b"assistant"], "content": np.array([b"q", b"a"], object)}}
  assert sources.to_python(value) == {"text": "café", "score": 0.5, "ids": [1, 2],
                                      "messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}


def test_seqio_record_uses_pretokenized_text():
  example = {"inputs": [5, 6], "inputs_pretokenized": "q", "targets": [7], "targets_pretokenized": "a", "id": 3}
  assert sources.seqio_record(example) == {"inputs": "q", "targets": "a", "prompt": "q", "completion": "a", "id": 3}
  assert sources.seqio_record({"targets": "t"}) == {"targets": "t", "text": "t"}


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TowerTinyChat(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(),
          "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(4), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"doc {i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": f"a{i}"}]}

  TowerTinyChat(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = sources.open_source(f"tfds:tower_tiny_chat?split=validation&data_dir={tmp_path}")
  got = sorted((src[i] for i in range(len(src))), key=lambda r: r["text"])
  assert got == [{"text": f"doc {i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": f"a{i}"}]} for i in range(2)]
  assert "tfds:tower_tiny_chat split validation" in src.locate(0)
  assert len(sources.open_source(f"tfds:tower_tiny_chat:1.0.0?data_dir={tmp_path}")) == 4


def test_seqio_source(tmp_path):
  seqio = pytest.importorskip("seqio")
  tf = pytest.importorskip("tensorflow")
  from towerplus_jax.data import tokenizers
  model = tokenizers.train_sentencepiece(["question answer"] * 10, str(tmp_path / "sp"), 300)
  vocab = seqio.SentencePieceVocabulary(model)

  def dataset_fn(split, shuffle_files, seed=None):
    return tf.data.Dataset.from_tensor_slices({"inputs": ["question 0", "question 1"], "targets": ["answer 0",
                                                                                                   "answer 1"]})

  name = "towerplus_test_tiny_task"
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                         preprocessors=[seqio.preprocessors.tokenize],
                         output_features={"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)})
  src = sources.open_source(f"seqio:{name}?split=train")
  assert len(src) == 2
  for i in range(2):
    assert src[i]["prompt"] == src[i]["inputs"] == f"question {i}"
    assert src[i]["completion"] == src[i]["targets"] == f"answer {i}"
  assert src.locate(1) == f"seqio:{name} split train example 1"


def test_missing_optional_packages_give_install_hint(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name in ("tensorflow_datasets", "seqio"):
      raise ImportError(f"No module named {name}")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_tfds)
  with pytest.raises(ImportError, match=r"towerplus_jax\[tfds\]"):
    sources.open_source("tfds:anything")
  with pytest.raises(ImportError, match=r"towerplus_jax\[seqio\]"):
    sources.open_source("seqio:anything")


@pytest.mark.parametrize("chunk", [1, 2, 3, 1 << 26])
def test_line_spans_match_split_for_any_scan_chunk(chunk):
  data = b'{"a": 1}\n\n{"b": 2}\r\n{"c": 3}'
  starts, ends = sources._line_spans(data, chunk)
  assert [data[s:e] for s, e in zip(starts, ends)] == data.split(b"\n")
