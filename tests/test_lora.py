"""LoRA (models/lora.py, training/lora.py): the adapted forward x W + scale·(x A)·B is qwix's (the oracle) and the
merged weights' (the export), the targets regex, QLoRA's quantised base, only adapters train, the reference is the
base, resume, base identity."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from configs import sft, tower_plus, wpo
from towerplus_jax import sharding
from towerplus_jax.convert import hf, peft
from towerplus_jax.files import checkpoint
from towerplus_jax.models import layout, lora, quant
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.run import chain, stage
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
def test_adapted_and_merged_forwards_are_qwix_lora_forward(family):
  """qwix (0.1.8) computes x W + (alpha / r) · x A B on the unscanned model's __call__; our layers and our merged
  weights agree."""
  model = adapted(scan=False, family=family)
  base = Transformer(model.cfg, rngs=nnx.Rngs(0))  # the same base, without adapters
  plain = base(TOKENS)
  oracle = qwix.apply_lora_to_model(base, qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0), TOKENS,
                                    rngs=nnx.Rngs(3))
  nnx.update(oracle, nnx.state(model, nnx.LoRAParam))  # same names, shapes: X_lora_a [*in, r], X_lora_b [r, *out]
  np.testing.assert_allclose(model(TOKENS), oracle(TOKENS), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lora.merged(model)(TOKENS), oracle(TOKENS), atol=1e-5, rtol=1e-5)
  assert not np.allclose(model(TOKENS), plain, atol=1e-3)  # the adapters do change it
  off = nnx.merge(nnx.graphdef(model), jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.LoRAParam)),
                  nnx.state(model, lora.BASE))
  np.testing.assert_array_equal(off(TOKENS), plain)  # adapters off: exactly the base


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
  np.testing.assert_allclose(model(TOKENS), unrolled(TOKENS), atol=1e-5, rtol=1e-5)


def test_fresh_adapters_leave_the_model_unchanged():
  cfg = ModelConfig.tiny()
  base = Transformer(cfg, rngs=nnx.Rngs(0))
  before = base(TOKENS)
  model = lora.apply(base, lora.Spec(8, 16.0), nnx.Rngs(1))
  np.testing.assert_array_equal(model(TOKENS), before)  # B = 0
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


def test_qlora_sft_trains_adapters_only_and_exports_what_it_computes(tmp_path, hf_logits):
  """SFT with adapters on an int8 base (QLoRA): the loss falls, the checkpoint holds the adapters, the base is never
  changed, and the merged export (loaded by transformers) computes what the run's adapted model computes."""
  c = small(sft.get_config("tiny"), steps=12)
  c.lora.base_dtype = "int8"
  c.optimizer.lr = 5e-2
  workdir = str(tmp_path / "w")
  run = stage.setup(c, str(tmp_path / "probe"))
  base = jax.device_get(nnx.to_pure_dict(nnx.state(run.model, lora.BASE)))
  assert jnp.dtype(jnp.int8) in {x.dtype for x in jax.tree.leaves(base)}
  stage.train(c, workdir)
  losses = [r["loss"] for r in rows(workdir)]
  assert np.mean(losses[-4:]) < losses[0] - 0.1, losses  # a random base: the adapters learn slowly, but they learn
  saved = json.load(open(tmp_path / "w" / peft.BASE_FILE))
  assert saved["base"].startswith("random init") and len(saved["fingerprint"]) == 2
  assert (tmp_path / "w" / "checkpoints" / "12" / "params").is_dir()  # the adapters only
  again = stage.setup(c, str(tmp_path / "probe2"))  # the same base (seeded), untouched by training
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(nnx.to_pure_dict(nnx.state(again.model, lora.BASE)))):
    np.testing.assert_array_equal(x, y)
  state = nnx.state(again.model, nnx.LoRAParam)
  nnx.replace_by_pure_dict(state, adapters(c, workdir))
  nnx.update(again.model, state)
  merged = str(tmp_path / "merged")
  hf.export_workdir(workdir, merged, dtype="float32")
  np.testing.assert_allclose(np.asarray(again.model(TOKENS)), hf_logits(merged, np.asarray(TOKENS)), atol=1e-4)


@pytest.mark.parametrize("loss", ["dpo", "wpo"])
def test_reference_is_the_base_at_step_one(tmp_path, loss):
  c = small(wpo.get_config("tiny"), steps=2)
  c.loss.name = loss
  run = stage.setup(c, str(tmp_path / "probe"))
  names = {p[-1] for p, _ in nnx.to_flat_state(run.ref_params)}  # a copy of the adapters, not of the weights
  assert names and all(n.endswith(("_lora_a", "_lora_b")) for n in names)
  stage.train(c, str(tmp_path / "w"))
  first = rows(tmp_path / "w")[0]
  assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/margins"] == 0, first


def adapters(c, workdir):
  """The adapters of a LoRA run's latest checkpoint."""
  target = nnx.to_pure_dict(nnx.state(stage.setup(c, workdir + "-probe").model, lora_run.TRAINABLE))
  return jax.device_get(checkpoint.restore_params(os.path.join(workdir, "checkpoints"), target))


def test_lora_resume_after_sigterm_is_bit_exact_and_keeps_its_base(tmp_path, monkeypatch, sigterm_on_batch):
  c = small(sft.get_config("tiny"), steps=6)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  stage.train(c, a)
  sigterm_on_batch(3)
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
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["base_model_name_or_path"] == folder
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


def test_aot_lora_stage_trains_adapters_against_the_base():
  from towerplus_jax.aot import programs
  config = wpo.get_config("tiny")
  config.lora.rank = 4
  mesh = sharding.make_mesh({"fsdp": -1})
  abstract = programs.abstract_stage(config, mesh)
  names = {p[-1] for p, _ in nnx.to_flat_state(abstract.state.params)}
  assert names and all(n.endswith(("_lora_a", "_lora_b")) for n in names)
  assert jax.tree.structure(abstract.state.reference) == jax.tree.structure(abstract.state.params)
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


# ------------------------------------------------------------------------------------------------ QLoRA
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantised_weights_are_within_half_a_step_of_the_weights(dtype):
  w = jax.random.normal(jax.random.key(0), (3, 16, 4, 8)) * jnp.arange(1, 9)  # [G, D, N, H], channels of all scales
  q, s = quant.quantize(w, (1,), dtype)
  assert q.dtype == jnp.dtype(dtype) and s.shape == (3, 1, 4, 8)
  assert int(jnp.abs(q.astype(jnp.int32)).max()) == quant.QMAX[dtype]  # each channel's largest |w| maps to qmax
  err = jnp.abs(quant.dequantize(q, s, jnp.float32) - w)
  assert bool(jnp.all(err <= s / 2 * (1 + 1e-6)))


@pytest.mark.parametrize("scan", [False, True])
def test_qlora_forward_is_the_base_within_its_quantisation_error(scan):
  cfg = dataclasses.replace(ModelConfig.tiny(), scan_layers=scan)
  exact = Transformer(cfg, rngs=nnx.Rngs(0))(TOKENS)
  bf16 = lora.store_base(Transformer(cfg, rngs=nnx.Rngs(0)), "bfloat16")(TOKENS)
  errors = {}
  for dtype in ("int8", "int4"):
    model = lora.store_base(Transformer(cfg, rngs=nnx.Rngs(0)), dtype)
    stored = {x.dtype for x in jax.tree.leaves(nnx.state(model))}
    assert stored == {jnp.dtype(dtype), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # weights, rest, scales
    errors[dtype] = float(jnp.abs(model(TOKENS) - exact).max())
    adapted = lora.apply(model, lora.Spec(4, 8.0), nnx.Rngs(1))
    adapters = nnx.state(adapted, nnx.LoRAParam)
    keys = jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters)))
    nnx.update(adapted, jax.tree.unflatten(jax.tree.structure(adapters), [
        jax.random.normal(k, x.shape, x.dtype) * 0.05 for k, x in zip(keys, jax.tree.leaves(adapters))]))
    np.testing.assert_allclose(adapted(TOKENS), lora.merged(adapted)(TOKENS), atol=1e-5)  # the export's weights
  scale = float(jnp.abs(exact).max())
  bf16_error = float(jnp.abs(bf16 - exact).max())
  assert bf16_error < errors["int8"] < errors["int4"] < 0.5 * scale, (bf16_error, errors, scale)
  assert errors["int8"] < 0.05 * scale, (errors, scale)


# ------------------------------------------------------------------------------------------------ init_from=peft:DIR
def peft_adapter(base_folder: str, out: str, targets=("q_proj", "v_proj", "down_proj")) -> str:
  """A PEFT LoRA adapter made by `peft` itself on an HF folder, with random (non-zero) B."""
  import torch
  import transformers
  from peft import LoraConfig, get_peft_model
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
  get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
                 ).save_pretrained(out)
  return out


def test_a_peft_adapter_continues_as_peft_runs_it(tmp_path, tiny_hf_model):
  import torch
  import transformers
  from peft import PeftModel
  folder = tiny_hf_model("qwen2", vocab_size=1024)
  adapter = peft_adapter(folder, str(tmp_path / "adapter"))
  tokens = np.random.default_rng(1).integers(3, 1024, size=(2, 10))
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():
    want = PeftModel.from_pretrained(base, adapter)(torch.as_tensor(tokens)).logits.numpy()
  c = small(sft.get_config("tiny_qwen2"), steps=2)
  c.init_from = f"peft:{adapter}"
  c.lora.update(rank=0, base_dtype="float32")  # rank 0: the adapter's
  for scan in (False, True):  # per layer, and stacked over the scanned groups
    c.model.scan_layers = scan
    model = stage.setup(c, str(tmp_path / f"probe{scan}")).model
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), want, atol=1e-4)
  workdir = str(tmp_path / "run")
  stage.train(c, workdir)  # continues it, and exports it as an adapter of the same base
  hf.export_workdir(workdir, str(tmp_path / "again"), adapter=True)
  config = json.load(open(tmp_path / "again" / peft.CONFIG_FILE))
  assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == folder
  assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]


def test_a_peft_adapter_that_does_not_fit_is_one_line(tmp_path, tiny_hf_model):
  adapter = peft_adapter(tiny_hf_model("qwen2", vocab_size=1024), str(tmp_path / "adapter"))
  c = small(sft.get_config("tiny_qwen2"), steps=1)
  c.init_from = f"peft:{adapter}"
  c.lora.rank = 8
  with pytest.raises(ValueError, match=rf"^config.lora.rank=8, but init_from=peft:{adapter} is an adapter of rank 4: "
                     r"set lora.rank=4 \(or 0: the adapter's\)$"):
    stage.setup(c, str(tmp_path / "w"))
  c.lora.rank = 0
  config_path = tmp_path / "adapter" / peft.CONFIG_FILE
  config = json.loads(config_path.read_text())
  other = tiny_hf_model("qwen2", vocab_size=1024, hidden_size=32)  # another base: another width
  config_path.write_text(json.dumps({**config, "base_model_name_or_path": other}))
  with pytest.raises(ValueError, match=r"^init_from=peft:.*layers.0.self_attn.q_proj.lora_A has shape \(4, 64\), "
                     r"which does not fit this qwen2 model \(embed_dim 32\): an adapter of another base$"):
    stage.setup(c, str(tmp_path / "w"))
  config_path.write_text(json.dumps({**config, "base_model_name_or_path": "Qwen/Qwen2.5-7B"}))
  with pytest.raises(ValueError, match=r"^init_from=peft:.*: its base_model_name_or_path 'Qwen/Qwen2.5-7B' is not a "
                     r"local Hugging Face folder \(with config.json\): download the base and set"):
    stage.setup(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_a_lora_chain_continues_one_adapter_through_sft_wpo_grpo_that_peft_loads(tmp_path, tiny_hf_model):
  """Issue 24's goal: an HF checkpoint through SFT -> WPO -> GRPO with LoRA (each stage continues the adapter on the
  same base, its reference the previous stage's policy) comes out as one PEFT adapter of that checkpoint. ~60 s."""
  import torch
  import transformers
  from peft import PeftModel
  folder = tiny_hf_model("qwen2", vocab_size=1024)
  c = tower_plus.get_config("tiny_qwen2")
  c.stage_order, c.eval_data = ["sft", "wpo", "grpo"], ""
  c.stages.sft.init_from = f"hf:{folder}"
  for name in c.stage_order:
    stage_config = c.stages[name]
    stage_config.train.update(steps=2, log_every=1, checkpoint_every=0, eval_steps=1)
    stage_config.lora.update(rank=4, alpha=8.0, base_dtype="float32")
    stage_config.optimizer.update(lr=5e-2, warmup_ratio=0.0)
  c.stages.grpo.loss.beta = 0.04
  workdir = str(tmp_path / "chain")
  chain.run(c, workdir)
  for name in c.stage_order:  # every stage adapts the HF checkpoint itself
    assert json.load(open(os.path.join(workdir, name, peft.BASE_FILE)))["base"] == f"hf:{folder}"
  first_wpo, (first_grpo, second_grpo) = rows(os.path.join(workdir, "wpo"))[0], rows(os.path.join(workdir, "grpo"))
  assert first_wpo["rewards/margins"] == 0 and first_grpo["kl"] == 0 < second_grpo["kl"]  # reference: the start
  adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
  hf.export_workdir(os.path.join(workdir, "grpo"), adapter, adapter=True)
  hf.export_workdir(os.path.join(workdir, "grpo"), merged, dtype="float32")
  tokens = torch.as_tensor(np.random.default_rng(1).integers(3, 1024, size=(2, 10)))
  load = lambda path: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                        attn_implementation="eager")
  with torch.no_grad():
    got = PeftModel.from_pretrained(load(folder), adapter)(tokens).logits.numpy()
    want, base = load(merged)(tokens).logits.numpy(), load(folder)(tokens).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert not np.allclose(want, base, atol=1e-3)
