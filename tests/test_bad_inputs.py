"""Bad input gets one clear line naming the key (or file) before anything is written; a busy workdir is refused."""
import os

import pytest

from configs import grpo, sft, tower_plus
from towerplus_jax import config_check, main, run_lock


@pytest.mark.parametrize("key,value,expected", [
    ("train.steps", 0, "config.train.steps=0: must be >= 1"),
    ("train.steps", -1, "config.train.steps=-1: must be >= 1"),
    ("optimizer.lr", -1e-3, "config.optimizer.lr=-0.001: must be > 0"),
    ("train.max_nonfinite", 0, "config.train.max_nonfinite=0: must be >= 1"),
    ("train.micro_batches", 0, "config.train.micro_batches=0: must be >= 1"),
    ("train.log_every", 0, "config.train.log_every=0: must be >= 1"),
    ("data.seq_len", 0, "config.data.seq_len=0: must be >= 2"),
    ("train.global_batch_size", 0, "config.train.global_batch_size=0: must be >= 1"),
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0: must be >= 1"),
    ("train.micro_batches", 3, "config.train.global_batch_size=8 is not divisible by config.train.micro_batches=3"),
])
def test_bad_stage_value_is_one_line_naming_the_key(tmp_path, key, value, expected):
  config = sft.get_config("tiny")
  section, name = key.split(".")
  config[section][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    main.run(config, str(workdir))
  assert str(e.value).startswith(expected)
  assert "\n" not in str(e.value)
  assert not workdir.exists()  # nothing written


def test_rl_values_and_reward_weights():
  config = grpo.get_config("tiny")
  config.rl.top_p = 0.0
  config.rl.reward_weights = (1.0,)
  found = config_check.errors(config)
  assert found == ["config.rl.top_p=0.0: must be in (0, 1] (1 = off)",
                   "config.rl.reward_weights has 1 entries for 3 config.rl.rewards ('chrf', 'rules', 'format'): "
                   "give one weight per reward function"]


def test_chain_checks_every_stage_before_the_first_runs(tmp_path):
  config = tower_plus.get_config("tiny")
  config.stages.grpo.rl.num_generations = 1
  with pytest.raises(ValueError, match=r"^config\.stages\.grpo\.rl\.num_generations=1: must be >= 2"):
    main.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_shipped_configs_pass():
  for module in (sft, grpo):
    for arg in ("tiny", "gemma2_2b", "qwen2_5_72b,runlocal"):
      config_check.check(module.get_config(arg))
  config_check.check(tower_plus.get_config("tiny"))


def test_second_trainer_on_a_workdir_refuses_naming_the_first(tmp_path):
  """A process holding the lock (as a running trainer does) makes main.run refuse before writing anything."""
  import subprocess
  import sys
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from towerplus_jax import run_lock\n"
       f"with run_lock.hold({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match=rf"workdir {tmp_path} is in use by another run \(pid {holder.pid} on "):
      main.run(sft.get_config("tiny"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock"]
  finally:
    holder.kill()
    holder.wait()
  with run_lock.hold(str(tmp_path)):  # released when its holder died (kill -9): no stale lock
    pass


# ---------------------------------------------------------------- data records: file:line + the field + what to do
import json  # noqa: E402
import re  # noqa: E402

from test_chat import CharTokenizer  # noqa: E402

from towerplus_jax.data import pipeline  # noqa: E402

GOOD = {"lm": {"text": "fine"}, "sft": {"prompt": "hi", "completion": "ok"},
        "preference": {"prompt": "hi", "chosen": "yes", "rejected": "no"},
        "rl": {"prompt": "Translate: hi", "reference": "olá"}}


@pytest.mark.parametrize("kind,bad,expected", [
    ("lm", {"text": 5}, "field 'text' must be a string, got int 5"),
    ("lm", {"text": None}, "field 'text' must be a string, got null"),
    ("lm", {"text": ["a", ["b"]]}, "field 'text' must be a string, got list"),
    ("lm", {"text": {"a": 1}}, "field 'text' must be a string, got dict"),
    ("sft", {"messages": None}, "field 'messages' must be a non-empty list of {'role', 'content'} messages, got null"),
    ("sft", {"messages": [{"role": "user"}]}, "field 'messages': message 0 must be {'role': str, 'content': str}"),
    ("sft", {"prompt": 3, "completion": "x"}, "field 'prompt' must be a non-empty list of"),
    ("preference", {"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ("preference", {"prompt": "p", "chosen": "", "rejected": "r"}, "field 'chosen' is missing or empty"),
    ("rl", {"prompt": "p", "rules": "max 3 words"}, "rules must be a list of rule dicts, got str"),
    ("rl", {"prompt": "p", "rules": [{"type": "max_words", "value": "many"}]},
     "max_words rule: 'value' must be a whole number, got 'many'"),
    ("rl", {"prompt": "p", "rules": [{"type": "max_word", "value": 3}]},
     "unknown rule type 'max_word' (did you mean 'max_words'?)"),
    ("rl", {"prompt": "p", "rules": [{"type": "include", "terms": "cat"}]},
     "include rule: 'terms' must be a list of non-empty strings"),
])
def test_bad_record_names_file_line_and_field(tmp_path, kind, bad, expected):
  path = tmp_path / "data.jsonl"
  path.write_text(json.dumps(GOOD[kind]) + "\n\n" + json.dumps(bad) + "\n")  # a blank line is skipped
  ds = pipeline.make_dataset(kind, str(path), CharTokenizer(), seq_len=32, batch_size=2, template="gemma", seed=0,
                             shuffle=False, repeat=False, num_threads=1)
  with pytest.raises(ValueError) as e:
    next(iter(ds))
  message = str(e.value)
  assert message.startswith(f"{path}:3: {expected}"), message
  assert "\n" not in message


@pytest.mark.parametrize("make,expected", [
    (lambda d: (d / "empty.jsonl").write_text("\n\n"), "{d}/empty.jsonl: no records (the file is empty"),
    (lambda d: (d / "empty.jsonl").mkdir(), "{d}/empty.jsonl is a directory, not a data file"),
])
def test_empty_file_or_directory_is_named(tmp_path, make, expected):
  from towerplus_jax.data import sources
  make(tmp_path)
  with pytest.raises(ValueError, match="^" + re.escape(expected.format(d=tmp_path))):
    sources.open_source(str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize("bad,expected", [
    ({"source": "Hi", "src_lang": "English", "tgt_lang": "German"}, "field 'reference' is missing"),
    ({"source": "Hi", "reference": None, "src_lang": "English", "tgt_lang": "German"}, "field 'reference' must be"),
    ({"source": "Hi", "reference": "Hallo", "tgt_lang": "German"}, "field 'src_lang' (a language name) or 'src'"),
])
def test_bad_test_set_record_is_named_before_decoding(tmp_path, bad, expected):
  from towerplus_jax.data import records, sources
  good = {"source": "Hi", "reference": "Hallo", "src": "en", "tgt": "de"}
  path = tmp_path / "test.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: {expected}")):
    records.read_all(sources.open_source(str(path)), "test")


def test_a_stopped_stage_stops_the_chain(tmp_path, monkeypatch):
  """SIGTERM during CPT: the chain must not go on into SFT/WPO/GRPO built on an unfinished CPT."""
  from towerplus_jax import checkpoint, train
  ran = []

  def fake_train(config, workdir):
    ran.append(os.path.basename(workdir))
    raise checkpoint.Stopped(3, config.train.steps, 15)

  monkeypatch.setattr(train, "train", fake_train)
  with pytest.raises(checkpoint.Stopped):
    main.run(tower_plus.get_config("tiny"), str(tmp_path))
  assert ran == ["cpt"]
