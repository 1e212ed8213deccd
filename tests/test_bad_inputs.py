"""Bad input gets one clear line naming the key (or file) before anything is written; a busy workdir is refused."""
import os
import shutil

import pytest

from configs import grpo, sft, tower_plus
from towerplus_jax.config import config_check
from towerplus_jax.files import run_lock
from towerplus_jax.run import chain


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
    ("train.steps", 2.5, "config.train.steps=2.5: must be an int"),  # a config file's wrong type (flags parse by type)
    ("model.remat", "ful", "config.model.remat='ful': must be one of none, full, dots, dots_no_batch, offload; "
                           "did you mean 'full'?"),
    ("loss.z_loss", -1.0, "config.loss.z_loss=-1.0: must be >= 0"),
])
def test_bad_stage_value_is_one_line_naming_the_key(tmp_path, key, value, expected):
  config = sft.get_config("tiny")
  section, name = key.split(".")
  config[section][name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    chain.run(config, str(workdir))
  assert str(e.value).startswith(expected)
  assert "\n" not in str(e.value)
  assert not workdir.exists()  # nothing written


@pytest.mark.parametrize("key,value,expected", [
    ("rl.temperature", 0.0, "config.rl.temperature=0.0: must be > 0"),
    ("loss.temperature", -1.0, "config.rl.temperature=-1.0: must be > 0"),  # one field with rl's: one line
    ("loss.epsilon_low", 1.5, "config.loss.epsilon_low=1.5: must be in [0, 1)"),
    ("loss.aggregation", "token_sum", "config.loss.aggregation='token_sum': must be one of token_mean, "
                                      "seq_mean_token_mean, seq_mean_token_sum_norm; did you mean 'token_mean'?"),
    ("loss.max_completion_length", 8, "config.loss.max_completion_length=8: no such key (configs/KEYS.md lists "
                                      "them); did you mean config.loss.max_completion_len?"),
])
def test_bad_grpo_value_is_the_key_tables_line(tmp_path, key, value, expected):
  config = grpo.get_config("tiny")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError) as e:
    chain.run(config, str(tmp_path / "run"))
  assert str(e.value) == expected
  assert not (tmp_path / "run").exists()


def test_rl_values_and_reward_weights():
  config = grpo.get_config("tiny")
  config.rl.top_p = 0.0
  config.rl.reward_weights = (1.0, 0.5)
  found = config_check.errors(config)
  assert found == ["config.rl.top_p=0.0: must be in (0, 1] (1 = off)",
                   "config.rl.reward_weights has 2 entries for 1 config.rl.rewards ('chrf',): "
                   "give one weight per reward function"]


def test_chain_checks_every_stage_before_the_first_runs(tmp_path):
  config = tower_plus.get_config("tiny")
  config.stages.grpo.rl.num_generations = 1
  with pytest.raises(ValueError, match=r"^config\.stages\.grpo\.rl\.num_generations=1: must be >= 2"):
    chain.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_shipped_configs_pass():
  for module in (sft, grpo):
    for arg in ("tiny", "gemma2_2b", "qwen2_5_72b,runlocal"):
      config_check.check(module.get_config(arg))
  config_check.check(tower_plus.get_config("tiny"))


def test_second_trainer_on_a_workdir_refuses_naming_the_first(tmp_path):
  """A process holding the lock (as a running trainer does) makes chain.run refuse before writing anything."""
  import subprocess
  import sys
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from towerplus_jax.files import run_lock\n"
       f"with run_lock.hold({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RuntimeError, match=rf"workdir {tmp_path} is in use by another run \(pid {holder.pid} on "):
      chain.run(sft.get_config("tiny"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".lock"]
  finally:
    holder.kill()
    holder.wait()
  with run_lock.hold(str(tmp_path)):  # released when its holder died (kill -9): no stale lock
    pass


def test_verbosity_1_shows_the_traceback_the_error_line_points_to(tmp_path):
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, "-m", "towerplus_jax.main", "--config=configs/sft.py:tiny", f"--workdir={tmp_path / 'w'}",
       f"--config.data.train={tmp_path / 'missing.jsonl'}", "--verbosity=1"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2 and "Traceback (most recent call last)" in out.stderr, out.stderr[-2000:]
  assert f"error: data file {tmp_path / 'missing.jsonl'} does not exist (traceback: rerun with --verbosity=1)" in (
      out.stderr)


def _small(config, **data):
  config.train.update(steps=1, global_batch_size=4, checkpoint_every=0)
  config.data.update(seq_len=64, eval="", **data)
  return config


def test_a_refused_resume_changes_nothing_in_the_run_folder(tmp_path):
  """Resuming a gemma2 run with another model family is refused before its model_config.json and tokenizer files
  are rewritten (export / evaluate of its checkpoints still read them)."""
  workdir = tmp_path / "run"
  chain.run(_small(sft.get_config("tiny")), str(workdir))
  files = {p: p.read_bytes() for p in [workdir / "model_config.json", *(workdir / "tokenizer").iterdir()]}
  with pytest.raises(ValueError, match=rf"^{workdir} holds checkpoints of another model than this config gives "
                     r"\(family='gemma2' there, 'qwen3' here; .*start a new --workdir$"):
    chain.run(_small(sft.get_config("tiny_qwen3")), str(workdir))
  assert {p: p.read_bytes() for p in files} == files
  assert sorted(os.listdir(workdir / "tokenizer")) == sorted(p.name for p in files if p.parent.name == "tokenizer")
  assert os.listdir(workdir / "checkpoints") == ["1"]


def test_a_failed_first_run_leaves_no_workdir(tmp_path):
  """A bad record found at the first batch: the workdir this run created is removed; one that existed stays."""
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"messages": None}) + "\n")
  with pytest.raises(ValueError, match=rf"^{path}:1: field 'messages' must be a non-empty list"):
    chain.run(_small(sft.get_config("tiny"), train=str(path)), str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()
  (tmp_path / "old").mkdir()
  with pytest.raises(ValueError, match=rf"^{path}:1: "):
    chain.run(_small(sft.get_config("tiny"), train=str(path)), str(tmp_path / "old"))
  assert (tmp_path / "old").is_dir()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_RECORD = {"source": "Hi", "reference": "Hallo", "src": "en", "tgt": "de"}


@pytest.mark.parametrize("args,expected", [
    (["main", "--config=configs/nope.py:tiny", "--workdir={t}/w"],
     "error: --config=configs/nope.py:tiny: no config file configs/nope.py (paths are relative to " + REPO + ")"),
    (["main", "--config=configs/sft.py:tiny", "--workdir={t}/w", "--config.model.dtype=float33"],
     "error: config.model.dtype='float33': must be one of float32, bfloat16, float16; did you mean 'float32'?"),
    (["main", "--config=configs/sft.py:tiny", "--workdir={t}/w", "--config.data.template=gemmma"],
     "error: config.data.template='gemmma': must be one of auto, gemma, chatml; did you mean 'gemma'?"),
    (["main", "--config=configs/sft.py:tiny", "--workdirr={t}/w"],
     "error: Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
    (["main", "--config=configs/sft.py:tiny", "--workdir={t}/test.jsonl"],
     "error: --workdir={t}/test.jsonl is an existing file, not a run folder: choose another --workdir"),
    (["main", "--config=configs/sft.py:tiny", "--workdir={t}/w", "--config.loss.name=dpo"],
     'error: config.loss.name=dpo needs preference data ({"prompt","chosen","rejected"}) but '
     "config.data.train='sample:chat,sample:parallel' is not: "),
    (["main", "--config=configs/wpo.py:tiny", "--workdir={t}/w", "--config.data.precomputed_reference=True"],
     "error: config.data.precomputed_reference=True needs ref_chosen_logp and ref_rejected_logp in every record"),
    (["reference", "--config=configs/wpo.py:tiny", "--workdir={t}/w", "--out=/no/such/dir/x.jsonl"],
     "error: --out=/no/such/dir/x.jsonl: folder /no/such/dir does not exist"),
    (["reference", "--config=configs/sft.py:tiny", "--workdir={t}/w", "--out={t}/x.jsonl"],
     "error: config.loss.name='sft' has no reference log-probs to precompute; use a config of one of dpo, wpo"),
    (["evaluate", "--workdir={t}/w", "--data={t}/missing.jsonl"], "error: data file {t}/missing.jsonl does not exist"),
    (["evaluate", "--workdir={t}/w", "--data={t}/test.jsonl"],
     "error: {t}/w/model_config.json not found: is {t}/w a towerplus_jax run folder?"),
    (["convert.hf", "import", "--hf={t}/hf", "--out={t}/w"],
     "error: {t}/hf/model.safetensors: not a readable safetensors file (Error while deserializing header: "),
])
def test_cli_bad_input_is_one_error_line_without_a_traceback(tmp_path, tiny_hf_model, args, expected):
  """Each CLI, run as a program: exit status 2, the last line `error: ...` naming the file / key / flag, no traceback,
  and no workdir left behind."""
  import subprocess
  import sys
  (tmp_path / "test.jsonl").write_text(json.dumps(TEST_RECORD) + "\n")
  if args[0] == "convert.hf":  # a truncated download
    weights = _copy_hf(tiny_hf_model("qwen2"), tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  argv = [a.replace("{t}", str(tmp_path)) for a in args[1:]]
  out = subprocess.run([sys.executable, "-m", f"towerplus_jax.{args[0]}", *argv], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith(expected.replace("{t}", str(tmp_path))), out.stderr[-3000:]
  assert not (tmp_path / "w").exists()


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
    ({"source": "Hi", "reference": "Hallo", "src": "en", "tgt": "dee"},
     "field 'tgt': unknown language code 'dee': did you mean 'de'? Use an ISO 639-1 code"),
    ({"source": "Hi", "reference": "Hallo", "src": "English", "tgt": "de"},
     "field 'src': unknown language code 'English': Use an ISO 639-1 code such as 'pt' or 'pt-BR' (see "
     "towerplus_jax/data/languages.py) (a language name goes in 'src_lang')"),
    ({"source": "Hi", "reference": "Hallo", "src": "en", "tgt": 7}, "field 'tgt' must be a string, got int 7"),
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
  from towerplus_jax.files import checkpoint
  from towerplus_jax.training import preemption
  from towerplus_jax.run import stage
  ran = []

  def fake_train(config, workdir):
    ran.append(os.path.basename(workdir))
    raise preemption.Stopped(3, config.train.steps, 15)

  monkeypatch.setattr(stage, "train", fake_train)
  with pytest.raises(preemption.Stopped):
    chain.run(tower_plus.get_config("tiny"), str(tmp_path))
  assert ran == ["cpt"]


# ---------------------------------------------------------------- HF folders and exports: refuse, never delete
def _copy_hf(folder, tmp_path, name="hf"):
  dst = tmp_path / name
  shutil.copytree(folder, dst)
  return dst


def test_export_never_deletes_what_it_did_not_write(tmp_path, tiny_hf_model):
  from towerplus_jax.convert import hf
  work = tmp_path / "work"
  hf.import_to_workdir(tiny_hf_model("qwen2"), str(work))
  before = sorted(p.relative_to(work) for p in work.rglob("*"))
  with pytest.raises(SystemExit, match=r"^error: --out=.*work holds \['checkpoints', 'model_config.json'"):
    hf.cli(["export", f"--workdir={work}", f"--out={work}"])  # --out = the run's own workdir
  with pytest.raises(SystemExit, match=r"which an export did not write"):
    hf.cli(["export", f"--workdir={work}", f"--out={work}", "--overwrite"])  # not even with --overwrite
  assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
  out = tmp_path / "export"
  hf.cli(["export", f"--workdir={work}", f"--out={out}", "--dtype=float32"])
  with pytest.raises(SystemExit, match=r"already holds an export; pass --overwrite"):
    hf.cli(["export", f"--workdir={work}", f"--out={out}"])
  hf.cli(["export", f"--workdir={work}", f"--out={out}", "--overwrite"])
  assert (out / "config.json").exists()
  with pytest.raises(SystemExit, match=r"^error: --out=.*work is not empty .*import into a new folder"):
    hf.cli(["import", f"--hf={tiny_hf_model('gemma2')}", f"--out={work}"])  # would turn qwen2 into gemma2
  assert sorted(p.relative_to(work) for p in work.rglob("*")) == before


@pytest.mark.parametrize("damage,expected", [
    ("config", "config.json: invalid JSON"),
    ("index", "model.safetensors.index.json maps model.embed_tokens.weight to wrong.safetensors, which does not "
              "hold it"),
    ("int", "tensor model.norm.weight is int32, not floating-point weights"),
    ("nan", "tensor model.norm.weight holds 1 NaN/Inf values"),
    ("truncated", "model.safetensors: not a readable safetensors file (Error while deserializing header: "),
])
def test_broken_hf_folder_is_named(tmp_path, tiny_hf_model, damage, expected):
  import numpy as np
  import safetensors.numpy

  from towerplus_jax.convert import hf
  folder = _copy_hf(tiny_hf_model("qwen2"), tmp_path)
  weights = folder / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(weights))
  if damage == "config":
    (folder / "config.json").write_text('{"model_type": "qwen2",')
  elif damage == "truncated":  # an interrupted download
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  elif damage == "index":
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, str(folder / "wrong.safetensors"))
    weight_map = {k: "wrong.safetensors" if k == "model.embed_tokens.weight" else "model.safetensors" for k in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  else:
    norm = tensors["model.norm.weight"]
    if damage == "int":
      tensors["model.norm.weight"] = norm.astype(np.int32)
    else:
      tensors["model.norm.weight"] = np.where(np.arange(norm.size) == 3, np.nan, norm).astype(norm.dtype)
    safetensors.numpy.save_file(tensors, str(weights), metadata={"format": "pt"})
  with pytest.raises(SystemExit) as e:
    hf.cli(["import", f"--hf={folder}", f"--out={tmp_path / 'run'}"])
  assert str(e.value).startswith("error: ") and expected in str(e.value), str(e.value)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- rows too short for the data: counted in the metrics
LONG = "word " * 400  # longer than any row below, whatever the tokenizer


@pytest.mark.parametrize("kind,pack,records", [
    ("lm", True, [{"text": "short"}, {"text": LONG}, {"text": "tiny"}, {"text": LONG}, {"text": "x"}]),
    ("lm", False, [{"text": LONG}, {"text": "short"}, {"text": "tiny"}]),
    ("sft", True, [{"prompt": LONG, "completion": "ok"}, {"prompt": "hi", "completion": "ok"},
                   {"prompt": "hi", "completion": LONG}]),
    ("preference", False, [{"prompt": LONG, "chosen": "a", "rejected": "b"},  # prompt > max_prompt_len
                           {"prompt": "p", "chosen": LONG, "rejected": "b"},  # response past the row
                           {"prompt": "p", "chosen": "a", "rejected": "b"}]),
    ("preference", True, [{"prompt": LONG, "chosen": "a", "rejected": "b"},  # packed: a pair is cut, never split
                          {"prompt": "p", "chosen": LONG, "rejected": "b"},
                          {"prompt": "p", "chosen": "a", "rejected": "b"}]),
])
def test_truncated_examples_are_counted_exactly(tmp_path, kind, pack, records):
  path = tmp_path / "data.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  seq_len = 48 if kind == "preference" and pack else 32  # packed: both sides of the short pair (19 + 19) in a row
  ds = pipeline.make_dataset(kind, str(path), CharTokenizer(), seq_len=seq_len, batch_size=2, template="gemma",
                             seed=0, repeat=False, pack=pack, max_prompt_len=20)
  counts = pipeline.DataCounts()
  for batch in ds:
    assert {"num_examples", "num_truncated"} & set(counts.take(batch)) == set()
  long = sum(LONG in json.dumps(r) for r in records)
  metrics = counts.metrics()
  assert 0 < metrics.pop("data/fill") <= 1
  assert metrics == {"data/truncated": long, "data/truncated_frac": long / len(records)}
  assert counts.metrics() == {}  # a window per call


def test_truncations_reach_the_metrics_with_a_warning(tmp_path, caplog):
  """A preference run over 4 records, 2 with prompts longer than max_prompt_len: each step's batch of 4 is one
  epoch, so each row says exactly 2 truncated."""
  from configs import wpo
  from towerplus_jax.run import stage
  records = [{"prompt": LONG if i in (1, 2) else f"Say {i}.", "chosen": "Yes.", "rejected": "No."} for i in range(4)]
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  c = wpo.get_config("tiny")
  c.data.update(train=str(path), seq_len=64)
  c.train.update(steps=2, global_batch_size=4, log_every=1, checkpoint_every=0)
  stage.train(c, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["data/truncated"], r["data/truncated_frac"]) for r in rows] == [(1, 2, 0.5), (2, 2, 0.5)]
  warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
  assert warnings[0].startswith("data: 2 example(s) so far did not fit a row of 64 tokens and were cut (prompts keep "
                                "their last data.max_prompt_len tokens"), warnings


def test_language_codes_and_names():
  """Codes are checked (variants as Tower writes them, any region of a known language); names are free text."""
  from towerplus_jax.data import chat, languages
  assert [languages.canonical(c) for c in ("pt_br", "PT-pt", "zh-tw", "es-latam", "de-AT", "es-419", "zh-Hant",
                                           "jpn")] == ["pt-BR", "pt-PT", "zh-TW", "es-LATAM", "de", "es", "zh", "ja"]
  for bad in ("xx", "pt-BRR", "english", "d"):
    with pytest.raises(ValueError, match=f"^unknown language code {bad!r}"):
      languages.canonical(bad)
  assert languages.name("pt-BR") == "Portuguese (Brazil)" and languages.name("zh_CN") == "Chinese (Simplified)"
  assert languages.code_of_name("Portuguese (Portugal)") == "pt" and languages.code_of_name("Klingon") is None
  # a record with codes only gets the names in its prompt; a record's own names win
  assert chat.translation_request({"source": "Hi", "src": "en", "tgt": "pt-BR"}) == chat.translation_prompt(
      "English", "Portuguese (Brazil)", "Hi")
  assert chat.translation_request({"source": "Hi", "src": "en", "tgt": "pt", "src_lang": "English",
                                   "tgt_lang": "European Portuguese"}).startswith("Translate the following English "
                                                                                 "source text to European Portuguese")


def test_evaluate_cli_refuses_an_unknown_code_before_loading(tmp_path):
  import subprocess
  import sys
  path = tmp_path / "test.jsonl"
  path.write_text(json.dumps({"source": "Hi", "reference": "Olá", "src": "en", "tgt": "pt-BR"}) + "\n" +
                  json.dumps({"source": "Hi", "reference": "Olá", "src": "en", "tgt": "pt-BRR"}) + "\n" +
                  json.dumps({"source": "Hi", "reference": "Hallo", "src": "en", "tgt": "xx"}) + "\n")
  out = subprocess.run([sys.executable, "-m", "towerplus_jax.evaluate", f"--hf={tmp_path / 'no_model'}",
                        f"--data={path}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: {path}:2: field 'tgt': unknown language code 'pt-BRR': did you mean 'pt-BR'? Use an ISO 639-1 code "
      "such as 'pt' or 'pt-BR' (see towerplus_jax/data/languages.py) (a language name goes in 'tgt_lang') "
      "(traceback: rerun with --verbosity=1)"), out.stderr[-2000:]


# ---------------------------------------------------------------- a full disk while saving: one line, nothing lost
FULL_DISK_AT_STEP_4 = """
import errno, os, runpy
from etils import epath
cls = type(epath.Path("/"))
write_text = cls.write_text
def full_disk(self, *args, **kwargs):  # the JSON item of the step-4 save hits a full disk
  if f"{os.sep}4.orbax-checkpoint-tmp{os.sep}data" in str(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
  return write_text(self, *args, **kwargs)
cls.write_text = full_disk
runpy.run_module("towerplus_jax.main", run_name="__main__")
"""


def test_full_disk_while_saving_is_one_line_and_the_rerun_resumes(tmp_path, caplog):
  import logging
  import subprocess
  import sys

  from towerplus_jax.files import checkpoint
  workdir = tmp_path / "run"
  overrides = {"data.seq_len": 64, "data.eval": "", "train.steps": 4, "train.global_batch_size": 4,
               "train.checkpoint_every": 2}  # step 4, the last, fails: its error surfaces when the run ends
  out = subprocess.run(
      [sys.executable, "-c", FULL_DISK_AT_STEP_4, "--config=configs/sft.py:tiny", f"--workdir={workdir}",
       *(f"--config.{k}={v}" for k, v in overrides.items())],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  ckpts = workdir / "checkpoints"
  assert out.returncode == 1, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: no space left on device while saving checkpoint step 4 to {ckpts}; free space and rerun to resume "
      "from step 2"), out.stderr[-3000:]
  assert sorted(os.listdir(ckpts)) == ["2", "4.orbax-checkpoint-tmp"]  # the failed save never committed
  ckpt = checkpoint.Checkpointer(str(ckpts))
  assert ckpt.latest_step() == 2  # the partial save is not a step
  ckpt.close()
  config = sft.get_config("tiny")
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  caplog.set_level(logging.INFO, logger="absl")
  chain.run(config, str(workdir))
  assert any(r.getMessage() == f"resumed from {ckpts} at step 2" for r in caplog.records)
  assert sorted(os.listdir(ckpts)) == ["2", "4"]  # the partial save's folder was removed


# ---------------------------------------------------------------- round 2, classes 4 and 5 through the CLIs
def test_a_comet_folder_the_real_package_would_not_build_is_one_line_before_decoding(tmp_path):
  """evaluate --comet_model with an unknown pool in hparams.yaml: one line naming the file, the key and what is
  allowed, before the model under test is even looked for (tests/test_comet.py has every hparams case)."""
  import subprocess
  import sys

  import yaml
  data = os.path.join(REPO, "tests", "data", "comet")
  shutil.copytree(os.path.join(data, "encoder"), tmp_path / "encoder")
  shutil.copytree(os.path.join(data, "regression"), tmp_path / "regression")
  hparams = tmp_path / "regression" / "hparams.yaml"
  hparams.write_text(yaml.safe_dump({**yaml.safe_load(hparams.read_text()), "pool": "maxx"}))
  (tmp_path / "test.jsonl").write_text(json.dumps(TEST_RECORD) + "\n")
  out = subprocess.run([sys.executable, "-m", "towerplus_jax.evaluate", f"--hf={tmp_path / 'no_model'}",
                        f"--data={tmp_path / 'test.jsonl'}", f"--comet_model={tmp_path / 'regression'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"error: {hparams}: pool='maxx' is not supported: must be one of avg, max, cls, default; did you mean 'max'?")
