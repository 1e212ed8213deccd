"""LoRA (models/lora.py, training/lora.py): merged forward = base + scale·A·B (qwix's numerics as the oracle), the
targets regex, only adapters train, the reference is the base, resume, base identity."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from configs import grpo, sft, wpo
from towerplus_jax import sharding
from towerplus_jax.convert import hf, peft
from towerplus_jax.files import checkpoint
from towerplus_jax.models import layout, lora
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.run import stage
from towerplus_jax.training import lora as lora_run
from towerplus_jax.training import optim, preemption

TOKENS = jnp.arange(12)[None] % 50


def adapted(scan: bool, family: str = "gemma2", targets: str = lora.DEFAULT_TARGETS) -> Transformer:
  """A tiny fp32 model with adapters whose B is random (not 0), so that they change the output."""
  cfg = dataclasses.replace(ModelConfig.tiny(family), scan_layers=scan)
  model = lora.apply(Transformer(cfg, rngs=nnx.Rngs(0)), lora.Spec(4, 8.0, targets), nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.key(2), 100))
  nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.05,
                                 nnx.state(model, nnx.LoRAParam)))
  return model


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_merged_forward_is_qwix_lora_forward(family):
  """qwix (0.1.8) computes x W + (alpha / r) · x A B on the unscanned model's __call__; our merged weights agree."""
  model = adapted(scan=False, family=family)
  base = nnx.merge(*nnx.split(model))  # a copy: qwix clones and re-classes its input
  oracle = qwix.apply_lora_to_model(base, qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0), TOKENS,
                                    rngs=nnx.Rngs(3))
  nnx.update(oracle, nnx.state(model, nnx.LoRAParam))  # same names, shapes: X_lora_a [*in, r], X_lora_b [r, *out]
  np.testing.assert_allclose(lora.merged(model)(TOKENS), oracle(TOKENS), atol=1e-5, rtol=1e-5)
  assert not np.allclose(lora.merged(model)(TOKENS), model(TOKENS), atol=1e-3)  # the adapters do change it


def test_merged_weights_are_base_plus_scaled_product_scanned():
  model = adapted(scan=True)
  merged = lora.merged(model)
  attn, mlp = model.stack[0].attn, model.stack[1].mlp
  want_q = attn.q_DNH[...] + 2.0 * jnp.einsum("gdr,grnh->gdnh", attn.q_DNH_lora_a[...], attn.q_DNH_lora_b[...])
  want_o = attn.o_NHD[...] + 2.0 * jnp.einsum("gnhr,grd->gnhd", attn.o_NHD_lora_a[...], attn.o_NHD_lora_b[...])
  want_down = mlp.down_FD[...] + 2.0 * jnp.einsum("gfr,grd->gfd", mlp.down_FD_lora_a[...], mlp.down_FD_lora_b[...])
  np.testing.assert_allclose(merged.stack[0].attn.q_DNH[...], want_q, atol=1e-6)
  np.testing.assert_allclose(merged.stack[0].attn.o_NHD[...], want_o, atol=1e-6)
  np.testing.assert_allclose(merged.stack[1].mlp.down_FD[...], want_down, atol=1e-6)
  unrolled = adapted(scan=False)  # the same weights and adapters unrolled: row g of a stacked adapter is its layer's
  state = nnx.state(unrolled)
  nnx.replace_by_pure_dict(state, layout.convert(nnx.to_pure_dict(nnx.state(model)), model.cfg, unrolled.cfg))
  nnx.update(unrolled, state)
  np.testing.assert_allclose(merged(TOKENS), lora.merged(unrolled)(TOKENS), atol=1e-5, rtol=1e-5)


def test_fresh_adapters_leave_the_model_unchanged():
  cfg = ModelConfig.tiny()
  base = Transformer(cfg, rngs=nnx.Rngs(0))
  before = base(TOKENS)
  model = lora.apply(base, lora.Spec(8, 16.0), nnx.Rngs(1))
  np.testing.assert_array_equal(lora.merged(model)(TOKENS), before)  # B = 0
  assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 2 * 7 * cfg.num_layers


def test_targets():
  model = adapted(scan=False, targets=r"layers\.1\.self_attn\.q_proj$")
  names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
  assert names == ["layers/1/attn/q_DNH_lora_a", "layers/1/attn/q_DNH_lora_b"]
  with pytest.raises(ValueError, match=r"^lora.targets='qproj' matches no module; module names are layers.N.NAME "
                     r"with N < \d+ and NAME one of self_attn.q_proj, .*, mlp.down_proj$"):
    adapted(scan=False, targets="qproj")
  with pytest.raises(ValueError, match=r"selects some but not all of layers \[0, 2\].*set model.scan_layers=False$"):
    adapted(scan=True, targets=r"layers\.0\.mlp")


def test_weight_decay_reaches_adapters():
  mask = optim.decay_mask(nnx.state(adapted(scan=False), nnx.LoRAParam))
  assert all(jax.tree.leaves(mask))


def small(c, steps):
  c.data.seq_len = 64
  c.train.update(steps=steps, global_batch_size=4, log_every=1, checkpoint_every=3, eval_steps=1)
  c.lora.update(rank=4, alpha=8.0, base_dtype="float32")
  return c


def rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"loss"' in line]


def test_lora_sft_trains_adapters_only(tmp_path):
  c = small(sft.get_config("tiny"), steps=12)
  c.optimizer.lr = 5e-2
  run = stage.setup(c, str(tmp_path / "probe"))
  base = jax.device_get(nnx.to_pure_dict(nnx.state(run.model, lora.BASE)))
  stage.train(c, str(tmp_path / "w"))
  losses = [r["loss"] for r in rows(tmp_path / "w")]
  assert np.mean(losses[-4:]) < losses[0] - 0.1, losses  # a random base: the adapters learn slowly, but they learn
  saved = json.load(open(tmp_path / "w" / peft.BASE_FILE))
  assert saved["base"].startswith("random init") and len(saved["fingerprint"]) == 2
  # the checkpoint holds the adapters only
  ckpt = tmp_path / "w" / "checkpoints" / "12" / "params"
  assert ckpt.is_dir()
  again = stage.setup(c, str(tmp_path / "probe2"))  # the same base (seeded), untouched by training
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(nnx.to_pure_dict(nnx.state(again.model, lora.BASE)))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("loss", ["dpo", "wpo"])
def test_reference_is_the_base_at_step_one(tmp_path, loss):
  c = small(wpo.get_config("tiny"), steps=2)
  c.loss.name = loss
  run = stage.setup(c, str(tmp_path / "probe"))
  assert run.ref_params is None and run.reference_is_base  # no second copy of the weights
  stage.train(c, str(tmp_path / "w"))
  first = rows(tmp_path / "w")[0]
  assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/margins"] == 0, first


def adapters(c, workdir):
  """The adapters of a LoRA run's latest checkpoint."""
  target = nnx.to_pure_dict(nnx.state(stage.setup(c, workdir + "-probe").model, lora_run.TRAINABLE))
  return jax.device_get(checkpoint.restore_params(os.path.join(workdir, "checkpoints"), target))


def test_lora_resume_after_sigterm_is_bit_exact_and_keeps_its_base(tmp_path, monkeypatch):
  c = small(sft.get_config("tiny"), steps=6)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  stage.train(c, a)
  calls = {"n": 0}
  shard_global_batch = sharding.shard_global_batch

  def sigterm_on_third_batch(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return shard_global_batch(batch, mesh)

  monkeypatch.setattr(sharding, "shard_global_batch", sigterm_on_third_batch)
  with pytest.raises(preemption.Stopped):
    stage.train(c, b)
  monkeypatch.undo()
  stage.train(c, b)
  for x, y in zip(jax.tree.leaves(adapters(c, a)), jax.tree.leaves(adapters(c, b))):
    np.testing.assert_array_equal(x, y)

  c.train.seed = 1  # another random base
  with pytest.raises(ValueError, match=r"holds LoRA adapters of another base \(random init \(model.preset=tiny, "
                     r"train.seed=0\), fingerprint .*\); this run's base is random init \(model.preset=tiny, "
                     r"train.seed=1\) .*or use a new workdir$"):
    stage.train(c, b)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_peft_adapter_export_loads_as_the_merged_export(family, tmp_path, tiny_hf_model, hf_logits):
  import torch
  import transformers
  from peft import PeftModel
  folder = tiny_hf_model(family, vocab_size=1024)
  c = small(sft.get_config(f"tiny_{family}"), steps=3)
  c.init_from = f"hf:{folder}"
  c.optimizer.update(lr=5e-2, warmup_ratio=0.0)
  c.lora.targets = r"(self_attn\.(q|v|o)|mlp\.down)_proj$"
  c.model.scan_layers = family == "gemma2"  # stacked adapters: one row per layer in the PEFT file
  workdir = str(tmp_path / "run")
  stage.train(c, workdir)
  merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
  hf.export_workdir(workdir, merged, dtype="float32")
  hf.export_workdir(workdir, adapter, adapter=True)
  config = json.load(open(os.path.join(adapter, peft.CONFIG_FILE)))
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == f"hf:{folder}"
  assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]

  tokens = np.random.default_rng(1).integers(3, 1024, size=(2, 10))
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    adapted_logits = PeftModel.from_pretrained(base, adapter)(torch.as_tensor(tokens)).logits.numpy()
  want = hf_logits(merged, tokens)
  np.testing.assert_allclose(adapted_logits, want, atol=1e-4)
  assert not np.allclose(want, hf_logits(folder, tokens), atol=1e-3)  # the adapters learnt something


def test_adapter_export_of_a_full_run_is_refused(tmp_path, tiny_hf_model):
  workdir, out = str(tmp_path / "full"), str(tmp_path / "adapter")
  hf.import_to_workdir(tiny_hf_model("qwen2"), workdir)
  run = subprocess.run([sys.executable, "-m", "towerplus_jax.convert.hf", "export", f"--workdir={workdir}",
                        f"--out={out}", "--adapter"], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
      f"error: --adapter: {workdir} is a full fine-tuning run (no lora_base.json), it has no adapters: export it "
      "without --adapter (nothing was written)"), run.stderr[-2000:]
  assert not os.path.exists(out)


def test_lora_grpo_kl_is_against_the_base(tmp_path):
  c = grpo.get_config("tiny")
  c.train.update(steps=2, log_every=1, checkpoint_every=0)
  c.lora.update(rank=4, alpha=8.0, base_dtype="float32")
  c.loss.beta = 0.04
  stage.train(c, str(tmp_path))
  first, second = rows(tmp_path)
  assert first["kl"] == 0 and second["kl"] > 0, (first["kl"], second["kl"])  # B = 0 at step 1: policy == base


def test_aot_lora_stage_trains_adapters_against_the_base():
  from towerplus_jax.aot import programs
  config = wpo.get_config("tiny")
  config.lora.rank = 4
  mesh = sharding.make_mesh({"fsdp": -1})
  abstract = programs.abstract_stage(config, mesh)
  names = {p[-1] for p, _ in nnx.to_flat_state(abstract.state.params)}
  assert names and all(n.endswith(("_lora_a", "_lora_b")) for n in names)
  assert abstract.state.reference is None and abstract.options.reference_is_base
  assert programs.train_step(config, mesh, abstract).memory.total > 0


def test_next_stage_starts_from_the_merged_lora_run(tmp_path):
  """A chained stage (init_from=ckpt:) on a LoRA run, and its evaluation, start from its base with the adapters merged
  in (as the export)."""
  c = small(sft.get_config("tiny"), steps=3)
  c.optimizer.update(lr=5e-2, warmup_ratio=0.0)
  first = str(tmp_path / "sft")
  stage.train(c, first)
  merged = str(tmp_path / "merged")
  hf.export_workdir(first, merged, dtype="float32")
  nxt = small(wpo.get_config("tiny"), steps=1)
  nxt.init_from = f"ckpt:{first}"
  nxt.model.scan_layers = True  # another layer layout than the LoRA run's
  nxt.lora.rank = 0
  model = stage.setup(nxt, str(tmp_path / "wpo")).model
  _, want = hf.load_hf(merged, overrides={"scan_layers": True})
  for x, y in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(want))):
    np.testing.assert_allclose(x, y, atol=1e-6)
  from towerplus_jax.evaluate import translation
  evaluated, _, _ = translation.load(workdir=first)  # evaluation of the LoRA run: the same merged weights
  for x, y in zip(jax.tree.leaves(nnx.state(evaluated)), jax.tree.leaves(nnx.state(hf.load_hf(merged)[1]))):
    np.testing.assert_allclose(x, y, atol=1e-6)
