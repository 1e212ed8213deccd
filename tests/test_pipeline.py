"""grain pipelines: exact resume from iterator state, seeded shuffling, disjoint host shards, packed segments that
never mix, loss masks hand-checked on a character tokenizer, the four batch formats, errors naming file:line."""
import json
import logging
import string

import numpy as np
import pytest
from test_chat import SPECIALS, CharTokenizer

from towerplus_jax.data import chat, formats, pipeline, tokenizers

TOK = CharTokenizer()
EOT = SPECIALS["<end_of_turn>"]
SAMPLE = tokenizers.SAMPLE_DIR


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
  return str(path)


def letter_docs(n=26):
  """Document k repeats letter k, with lengths 3..40 (some longer than the rows used below)."""
  rng = np.random.default_rng(0)
  return [{"text": c * int(rng.integers(3, 41))} for c in string.ascii_letters[:n]]


def parallel(n=12):
  return [{"source": f"Hello {i}", "reference": f"Olá {i}", "src_lang": "English",
           "tgt_lang": "Portuguese (Portugal)", "src": "en", "tgt": "pt"} for i in range(n)]


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if isinstance(x[k], np.ndarray):
        np.testing.assert_array_equal(x[k], y[k])
      else:
        assert x[k] == y[k]


def dataset(kind, path, **kw):
  args = dict(seq_len=32, batch_size=4, template="gemma", seed=0, max_prompt_len=40 if kind == "rl" else None)
  return pipeline.make_dataset(kind, path, TOK, **{**args, **kw})


@pytest.fixture
def files(tmp_path):
  return {
      "lm": write_jsonl(tmp_path / "mono.jsonl", letter_docs()),
      "sft": write_jsonl(tmp_path / "chat.jsonl", parallel() + [{"prompt": f"q{i}", "completion": f"a{i}"}
                                                                for i in range(8)]),
      "preference": write_jsonl(tmp_path / "pref.jsonl", [{"prompt": f"p{i}", "chosen": "yes" * (i % 3 + 1),
                                                           "rejected": "no"} for i in range(10)]),
      "rl": write_jsonl(tmp_path / "rl.jsonl", [{"prompt": f"question {i}", "answer": str(i)} for i in range(10)]),
  }


@pytest.mark.parametrize("kind", formats.FORMATS)
def test_resume_from_iterator_state(files, kind):
  it = iter(dataset(kind, files[kind]))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  fresh = iter(dataset(kind, files[kind]))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)


def test_shuffle_is_deterministic_for_a_seed(files):
  first = lambda seed, shuffle=True: take(iter(dataset("rl", files["rl"], seed=seed, shuffle=shuffle)), 2)
  order = lambda batches: [r["answer"] for b in batches for r in b["records"]]
  assert_batches_equal(first(7), first(7))
  assert order(first(7)) != order(first(8))
  assert order(first(7, shuffle=False)) == [str(i) for i in range(8)]


def test_epochs_are_reshuffled_and_complete(files):
  it = iter(dataset("rl", files["rl"], batch_size=5))
  epochs = [[r["answer"] for b in take(it, 2) for r in b["records"]] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(str(i) for i in range(10))
  assert epochs[0] != epochs[1]


def test_lm_packed_segments_never_mix(files):
  docs = letter_docs()
  batches = list(dataset("lm", files["lm"], repeat=False, shuffle=False))
  counts = {c: 0 for c in string.ascii_letters}
  for b in batches:
    assert b["inputs"].shape == (4, 32) and b["inputs"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
    for row in range(4):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      for s in range(1, seg.max() + 1):
        idx = np.flatnonzero(seg == s)
        inputs, targets = b["inputs"][row, idx], b["targets"][row, idx]
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        np.testing.assert_array_equal(inputs[1:], targets[:-1])  # targets are inputs shifted by one
        letters = {chr(t - 10) for t in np.concatenate([inputs, targets]) if t >= 10}
        assert len(letters) == 1  # one document per segment
        counts[letters.pop()] += int(np.sum(inputs >= 10))
  assert counts == {c: len(d["text"]) for c, d in zip(string.ascii_letters, docs)} | {
      c: 0 for c in string.ascii_letters[len(docs):]}


def test_lm_document_is_bos_text_eos(tmp_path):
  path = write_jsonl(tmp_path / "one.jsonl", [{"text": "abc"}, parallel(1)[0]])
  b = next(iter(dataset("lm", path, pack=False, shuffle=False, batch_size=2, repeat=False)))
  want = [[TOK.bos_id, *TOK.encode("abc"), TOK.eos_id], [TOK.bos_id, *TOK.encode("Hello 0\nOlá 0"), TOK.eos_id]]
  for row, ids in enumerate(want):
    n = len(ids) - 1
    np.testing.assert_array_equal(b["inputs"][row, :n], ids[:-1])
    np.testing.assert_array_equal(b["targets"][row, :n], ids[1:])
    assert b["segment_ids"][row].sum() == n


def test_sft_loss_mask_is_exactly_the_assistant_tokens(tmp_path):
  path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "hi", "completion": "ok"}])
  b = next(iter(dataset("sft", path, pack=False, batch_size=1, repeat=False)))
  # <bos> <sot> u s e r \n h i <eot> \n <sot> m o d e l \n o k <eot> \n : "o", "k", <eot> are tokens 18, 19, 20,
  # i.e. targets 17, 18, 19.
  want = np.zeros(32, np.float32)
  want[[17, 18, 19]] = 1
  np.testing.assert_array_equal(b["loss_mask"][0], want)
  assert [int(t) for t in b["targets"][0, 17:20]] == [*TOK.encode("ok"), EOT]
  assert b["segment_ids"][0].sum() == 21


def test_sft_parallel_record_is_a_tower_translation_chat(tmp_path):
  record = parallel(1)[0]
  path = write_jsonl(tmp_path / "one.jsonl", [record])
  b = next(iter(dataset("sft", path, seq_len=256, pack=False, batch_size=1, repeat=False)))
  prompt = chat.translation_prompt("English", "Portuguese (Portugal)", "Hello 0")
  ids, mask = chat.encode_chat(TOK, "gemma", [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": "Olá 0"}])
  n = len(ids) - 1
  np.testing.assert_array_equal(b["inputs"][0, :n], ids[:-1])
  trained = b["targets"][0][b["loss_mask"][0] > 0]
  assert TOK.decode(trained) == "Olá 0" and trained[-1] == EOT


def test_eval_last_batch_is_padded_with_empty_rows(tmp_path):
  path = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "hi", "completion": "ok"}] * 3)
  batches = list(dataset("sft", path, pack=False, repeat=False, batch_size=2))
  assert len(batches) == 2
  assert batches[1]["inputs"].shape == (2, 32)
  assert batches[1]["segment_ids"][1].sum() == 0 and batches[1]["loss_mask"][1].sum() == 0


def test_preference_batch(tmp_path):
  records = [{"prompt": "p", "chosen": "good", "rejected": "bad", "ref_chosen_logp": -1.5, "ref_rejected_logp": -2.0},
             {"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no",
              "ref_chosen_logp": -0.5, "ref_rejected_logp": -3.0}]
  path = write_jsonl(tmp_path / "pref.jsonl", records)
  b = next(iter(dataset("preference", path, batch_size=2, shuffle=False, repeat=False, seq_len=64,
                            max_prompt_len=32, pack=False)))
  for side in ("chosen", "rejected"):
    assert {f"{side}_{k}" for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")} <= set(b)
    for row, rec in enumerate(records):
      prompt = chat.as_messages(rec["prompt"], "user")
      ids, _ = chat.encode_chat(TOK, "gemma", prompt + [{"role": "assistant", "content": rec[side]}])
      n = len(ids) - 1
      np.testing.assert_array_equal(b[f"{side}_inputs"][row, :n], ids[:-1])
      np.testing.assert_array_equal(b[f"{side}_positions"][row, :n], np.arange(n))
      assert b[f"{side}_segment_ids"][row].sum() == n
      trained = b[f"{side}_targets"][row][b[f"{side}_loss_mask"][row] > 0]
      assert TOK.decode(trained) == rec[side] and trained[-1] == EOT
  np.testing.assert_array_equal(b["ref_chosen_logp"], np.float32([-1.5, -0.5]))
  np.testing.assert_array_equal(b["ref_rejected_logp"], np.float32([-2.0, -3.0]))


def test_preference_reference_logps_all_or_none(tmp_path):
  bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)
  b = next(iter(dataset("preference", bare, batch_size=2, repeat=False)))
  assert "ref_chosen_logp" not in b and "ref_rejected_logp" not in b
  mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                  {"prompt": "p", "chosen": "a", "rejected": "b",
                                                   "ref_chosen_logp": -1.0, "ref_rejected_logp": -1.0}])
  with pytest.raises(ValueError, match="some preference records have ref_chosen_logp"):
    next(iter(dataset("preference", mixed, batch_size=2, repeat=False)))


def test_preference_padded_last_batch_and_record_index(tmp_path):
  """3 records in batches of 2: the padding row of the last batch is not a record missing its reference log-probs."""
  bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)])
  batches = list(dataset("preference", bare, batch_size=2, shuffle=False, repeat=False, pack=False))
  assert len(batches) == 2 and all("ref_chosen_logp" not in b for b in batches)
  assert batches[0]["record_index"].tolist() == [0, 1] and batches[1]["record_index"][0] == 2
  with_ref = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                                   "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}] * 3)
  last = list(dataset("preference", with_ref, batch_size=2, shuffle=False, repeat=False, pack=False))[-1]
  np.testing.assert_array_equal(last["ref_chosen_logp"], np.float32([-1.0, 0.0]))


def test_preference_truncation_keeps_prompt_end(tmp_path):
  path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 50, "chosen": "y" * 50, "rejected": "n"}])
  b = next(iter(dataset("preference", path, batch_size=1, repeat=False, max_prompt_len=10, pack=False)))
  prompt_ids, _ = chat.encode_chat(TOK, "gemma", [{"role": "user", "content": "x" * 50}], True)
  np.testing.assert_array_equal(b["chosen_inputs"][0, :10], prompt_ids[-10:])
  assert b["chosen_segment_ids"][0].sum() == 32  # cut to the row
  assert TOK.decode(b["rejected_targets"][0][b["rejected_loss_mask"][0] > 0]) == "n"


def test_rl_batch(tmp_path, caplog):
  records = [{"prompt": "short", "answer": "1"}, {"prompt": "z" * 200, "answer": "2"}, parallel(1)[0]]
  path = write_jsonl(tmp_path / "rl.jsonl", records)
  with caplog.at_level(logging.WARNING):
    (b,) = list(dataset("rl", path, batch_size=4, shuffle=False, repeat=False, max_prompt_len=150))
  assert "dropped 1 prompt" in caplog.text and b["num_dropped"] == 1
  # repeated: each batch counts the prompts dropped while it was filled (short, long, short | long, short, long, ...)
  it = iter(dataset("rl", write_jsonl(tmp_path / "rl2.jsonl", records[:2] * 2), batch_size=2, shuffle=False,
                    max_prompt_len=150))
  assert [next(it)["num_dropped"] for _ in range(3)] == [1, 2, 2]
  prompt = chat.translation_prompt("English", "Portuguese (Portugal)", "Hello 0")
  assert b["records"] == [records[0], {**records[2], "prompt": prompt}]
  for row, text in enumerate(["short", prompt]):
    ids, _ = chat.encode_chat(TOK, "gemma", [{"role": "user", "content": text}], add_generation_prompt=True)
    assert b["prompt_lengths"][row] == len(ids)
    np.testing.assert_array_equal(b["prompt_tokens"][row], ids + [TOK.pad_id] * (150 - len(ids)))


def test_rl_all_prompts_too_long_raises(tmp_path):
  path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "z" * 40}] * 3)
  with pytest.raises(ValueError, match="every prompt is longer"):
    next(iter(dataset("rl", path, max_prompt_len=8)))


def test_malformed_jsonl_names_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
  with pytest.raises(ValueError, match=rf"{bad}:3: invalid JSON"):
    list(dataset("lm", str(bad), repeat=False, shuffle=False))
  missing = write_jsonl(tmp_path / "missing.jsonl", [parallel(1)[0], {"source": "a", "reference": "b"}])
  with pytest.raises(ValueError, match=rf"{missing}:2: missing key 'src_lang'"):
    list(dataset("sft", missing, repeat=False, shuffle=False))
  wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "only text"}])
  with pytest.raises(ValueError, match=rf"{wrong}:1: no conversation"):
    list(dataset("sft", wrong, repeat=False))


def test_bad_arguments(files):
  with pytest.raises(ValueError, match="unknown batch format"):
    dataset("dpo", files["lm"])


@pytest.mark.skipif(not tokenizers.sample_texts(), reason="no shipped sample yet")
@pytest.mark.parametrize("kind, names", [("lm", "mono,parallel,chat"), ("sft", "chat,parallel,test"),
                                         ("preference", "preferences"), ("rl", "ifmt,parallel,copy,math")])
def test_shipped_sample_through_every_format(sample_tok, kind, names):
  tok = sample_tok
  paths = [f"{SAMPLE}/{n}.jsonl" for n in names.split(",")]
  for template in ("gemma", "chatml"):
    ds = pipeline.make_dataset(kind, paths, tok, seq_len=128, batch_size=8, template=template, seed=0,
                               max_prompt_len=96)
    n = sum(len(b["records"]) if kind == "rl" else len(next(iter(b.values()))) for b in take(iter(ds), 3))
    assert n == 24
