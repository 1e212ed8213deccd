"""The whole loop on the shipped sample: resume after SIGTERM is bit-exact, configs load and lock, bad keys fail."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import cpt, grpo, sft, tower_plus, wpo
from towerplus_jax import sharding
from towerplus_jax.convert import tokenizer_files
from towerplus_jax.files import checkpoint
from towerplus_jax.training import preemption
from towerplus_jax.models import config as model_config
from towerplus_jax.run import stage
from towerplus_jax.training import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(c, steps=6):
  c.data.seq_len = 64
  c.train.update(steps=steps, global_batch_size=4, log_every=1, checkpoint_every=3, eval_steps=1)
  return c


def final_params(workdir):
  cfg = model_config.load_json(workdir)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  model = weights.restore_model(cfg, mesh, os.path.join(workdir, "checkpoints"))
  from flax import nnx
  return jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def test_resume_after_sigterm_is_bit_exact(tmp_path, monkeypatch, sigterm_on_batch):
  c = small(sft.get_config("tiny"))
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  first = stage.train(c, a)
  assert np.isfinite(first["loss"]) and "eval/loss" in first

  sigterm_on_batch(3)
  with pytest.raises(preemption.Stopped, match=r"^stopped at step 3 of \d+ \(SIGTERM\); a checkpoint was saved: "
                     r"rerun the same command to resume$") as stopped:
    stage.train(c, b)
  assert stopped.value.exit_code == 143  # non-zero: tpu_run.sh retries, and the retry resumes
  monkeypatch.undo()
  ckpt = checkpoint.Checkpointer(os.path.join(b, "checkpoints"))
  assert ckpt.latest_step() == 3  # the SIGTERM'd run saved where it stopped
  ckpt.close()
  stage.train(c, b)  # resumes at step 3: params, optimizer, step, rng and data iterator
  for x, y in zip(jax.tree.leaves(final_params(a)), jax.tree.leaves(final_params(b))):
    np.testing.assert_array_equal(x, y)


def test_loss_falls_on_the_sample(tmp_path):
  c = small(cpt.get_config("tiny"), steps=30)
  c.train.log_every = 5
  stage.train(c, str(tmp_path))
  import json
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  losses = [r["loss"] for r in train_rows]
  assert losses[-1] < losses[0] - 0.5, losses
  assert os.path.isdir(tmp_path / "tensorboard") and train_rows[-1]["perf/tokens_per_sec"] > 0
  assert rows[-1]["step"] == 30 and rows[-1]["eval/loss"] < losses[0]  # the end-of-stage eval is recorded too


@pytest.mark.parametrize("module", [cpt, sft, wpo, grpo])
@pytest.mark.parametrize("arg", ["tiny", "gemma2_2b", "qwen2_5_7b,runlocal", "gemma3_4b", "qwen3_8b"])
def test_every_config_loads(module, arg):
  c = module.get_config(arg)
  assert c.loss.name in ("lm", "sft", "wpo", "grpo")
  assert tokenizer_files.resolve_template(c) == ("chatml" if arg.startswith("qwen") else "gemma")


@pytest.mark.parametrize("module", [cpt, sft, wpo, grpo])
@pytest.mark.parametrize("preset", ["gemma2_2b", "qwen2_5_7b"])
def test_runlocal_shrinks_every_stage_of_a_real_preset(module, preset):
  full, small_ = module.get_config(preset), module.get_config(f"{preset},runlocal")
  assert full.train.steps >= 1000 and full.train.global_batch_size >= 32
  assert small_.train.steps <= 10 and small_.train.global_batch_size <= 2 and small_.data.seq_len <= 256
  assert small_.model.remat == "none"
  if "rl" in small_:
    assert small_.train.global_batch_size == small_.rl.prompts_per_step * small_.rl.num_generations
    assert small_.loss.max_completion_len == small_.rl.max_completion_len <= 32


def test_tower_plus_config_chains_stages():
  c = tower_plus.get_config("tiny")
  assert list(c.stage_order) == ["cpt", "sft", "wpo", "grpo"]
  assert [c.stages[s].init_from for s in c.stage_order] == ["", "previous", "previous", "previous"]


def run_main(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "towerplus_jax.main", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, hint", [
    (["--config=configs/sft.py:tiny", "--config.train.stepz=3"], "did you mean --config.train.steps"),
    (["--config=configs/sft.py:gemma9_2b"], "did you mean 'gemma2_2b'"),
    (["--config=configs/cpt.py:tiny_nope"], "known presets: "),
    (["--config=configs/sft.py:tiny", "--config.model.preset=qwen25_7b"], "did you mean 'qwen2_5_7b'"),
])
def test_bad_names_fail_with_one_line_before_writing(tmp_path, args, hint):
  out = run_main(*args, f"--workdir={tmp_path / 'w'}")
  assert out.returncode != 0 and hint in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "w")


def test_malformed_jsonl_names_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n' + '{"text": "x"}\n' * 5)
  out = run_main("--config=configs/cpt.py:tiny", f"--workdir={tmp_path / 'w'}", f"--config.data.train={bad}",
                 "--config.data.eval=", "--config.train.steps=2")
  assert out.returncode != 0
  assert f"{bad}:3" in out.stderr or f"{bad}, line 3" in out.stderr, out.stderr[-2000:]


def test_init_from_hf_then_export_to_hf(tmp_path, tiny_hf_model, hf_logits):
  """A stage starts from a HF folder; its checkpoint exports back to a HF folder transformers loads."""
  folder = tiny_hf_model("qwen3", vocab_size=1024)
  c = small(sft.get_config("tiny_qwen3"), steps=2)
  c.init_from = f"hf:{folder}"
  c.optimizer.lr = 0.0  # params must stay the HF ones
  c.optimizer.weight_decay = 0.0
  workdir = str(tmp_path / "run")
  stage.train(c, workdir)
  out = str(tmp_path / "hf_out")
  subprocess.run([sys.executable, "-m", "towerplus_jax.convert.hf", "export", f"--workdir={workdir}", f"--out={out}",
                  "--dtype=float32"], cwd=REPO, check=True, capture_output=True, env={**os.environ,
                                                                                      "JAX_PLATFORMS": "cpu"})
  tokens = np.random.default_rng(1).integers(3, 1024, size=(2, 10))
  np.testing.assert_allclose(hf_logits(out, tokens), hf_logits(folder, tokens), atol=1e-5)
  assert os.path.exists(os.path.join(out, "tokenizer.model"))


def test_init_from_hf_takes_the_folders_tokenizer_and_template(tmp_path, tiny_hf_model, sample_sp_path):
  folder = str(tmp_path / "hf")
  shutil.copytree(tiny_hf_model("qwen2", vocab_size=1024), folder)
  c = sft.get_config("tiny")  # a gemma2-family preset: the folder's tokenizer and template win
  c.init_from = f"hf:{folder}"
  with pytest.raises(ValueError, match="1024 ids but the model .* 256 embedding rows"):
    c.init_from = f"hf:{tiny_hf_model('qwen2')}"  # 256 rows, no tokenizer: the tiny default is the sample's 1024
    stage.setup(c, str(tmp_path / "small"))
  c.init_from = f"hf:{folder}"
  shutil.copy(sample_sp_path, os.path.join(folder, "tokenizer.model"))
  run = stage.setup(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # setup only checks: the files are written once the run is known valid
  run.save_files()
  assert run.tokenizer.path == os.path.join(folder, "tokenizer.model") and c.data.template == "chatml"
  assert "<|im_end|>" in open(tmp_path / "w" / "tokenizer" / "tokenizer_config.json").read()


def test_tower_plus_chain_runs_every_stage_from_the_previous(tmp_path):
  """Each stage starts from the previous one's checkpoint and, with the shipped tiny learning rates, β, rewards and
  data, visibly does its own job: CPT/SFT loss falls, WPO's margins and accuracy rise, GRPO's mean reward rises."""
  from towerplus_jax.run import chain, report
  c = tower_plus.get_config("tiny")
  for name, steps in zip(c.stage_order, (12, 12, 16, 20)):
    c.stages[name].train.update(steps=steps, global_batch_size=4, log_every=1, checkpoint_every=0, eval_steps=1)
    if name != "grpo":
      c.stages[name].data.seq_len = 64 if name != "wpo" else 96
  c.stages.wpo.data.max_prompt_len = 64
  c.stages.grpo.rl.update(num_generations=4, prompts_per_step=2, max_completion_len=12)
  c.eval_max_new_tokens = 4
  results = chain.run(c, str(tmp_path))
  assert list(results) == ["cpt", "sft", "wpo", "grpo"]
  for name in c.stage_order:
    assert 0.0 <= results[name]["heldout/chrf"] <= 100.0
    assert os.path.exists(tmp_path / name / "eval" / "report.json")
  assert "reward/mean" in results["grpo"] and "rewards/margins" in results["wpo"]
  moved = {name: report.trend(str(tmp_path / name), report.trend_keys(c.stages[name]))[0]
           for name in c.stage_order}
  print(moved)
  for name, key, sign in (("cpt", "loss", -1), ("sft", "loss", -1), ("wpo", "loss", -1),
                          ("wpo", "rewards/margins", 1), ("wpo", "rewards/accuracies", 1), ("grpo", "reward/mean", 1)):
    first, last = moved[name][key]
    assert sign * (last - first) > 0, (name, key, first, last)
  import json
  for name in ("cpt", "sft"):  # end-of-stage eval loss and held-out scores sit next to the training metrics
    rows = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    assert any("eval/loss" in r for r in rows) and any("heldout/chrf" in r for r in rows)
  text = report.summary(results, str(tmp_path), c)
  assert f"export --workdir={tmp_path / 'grpo'}" in text and "heldout/chrf" in text
  assert "reward/mean " in text and " -> " in text
  assert str(tmp_path / "cpt" / "eval" / "report.json") in text
