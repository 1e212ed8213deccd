"""HF <-> ours conversion: configs (presets, legacy config.json, transformers' own defaults), export that
transformers loads bit-exactly, import/export identity, shards + index, Gemma 3 multimodal names, placement on a
mesh, CLI, errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from towerplus_jax import sharding
from towerplus_jax.convert import hf, hf_config
from towerplus_jax.data import tokenizers
from towerplus_jax.models import config as model_config
from towerplus_jax.models.config import FAMILIES, PRESETS, preset

MODEL_TYPES = {"gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}


def _pure(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, (_, v) in hf.named_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def _hf_model(folder: str) -> torch.nn.Module:
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def _files_tensors(folder: str) -> dict[str, torch.Tensor]:
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(folder, name)))
  return out


def _copy_with(folder: str, dst: str, tensors: dict, config: dict | None = None) -> str:
  os.makedirs(dst)
  shutil.copy(os.path.join(folder, "config.json"), dst)
  if config is not None:
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(config, f)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return dst


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", sorted(PRESETS) + [f"tiny_{f}" for f in FAMILIES])
def test_config_roundtrip(name):
  cfg = preset(name)
  assert hf_config.config_from_hf(hf_config.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_config_to_hf_is_what_transformers_reads(family):
  cfg = preset(f"tiny_{family}")
  d = hf_config.config_to_hf(cfg, dtype="float32")
  loaded = transformers.AutoConfig.for_model(**d)
  assert type(loaded) is MODEL_TYPES[d["model_type"]]
  assert [t.removesuffix("_attention") for t in loaded.layer_types] == [cfg.layer_type(i) for i in range(4)]
  assert (loaded.head_dim, loaded.num_key_value_heads, loaded.tie_word_embeddings) == (16, 2, cfg.tie_embeddings)
  assert hf_config.config_from_hf(loaded.to_dict()) == cfg  # transformers' own serialisation parses back


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_hf_defaults_match_transformers(model_type):
  """A config.json that leaves every field out means transformers' class defaults."""
  full = MODEL_TYPES[model_type]().to_dict()
  assert hf_config.config_from_hf({"model_type": model_type}) == hf_config.config_from_hf(full)


# Real transformers-4.x config.json files of the Hub (abridged to the fields that matter).
LEGACY = {
    "gemma2_2b": {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                  "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
                  "hidden_size": 2304, "intermediate_size": 9216, "model_type": "gemma2", "num_attention_heads": 8,
                  "num_hidden_layers": 26, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
                  "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
                  "vocab_size": 256000},
    "gemma3_4b": {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                  "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                                  "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                  "sliding_window": 1024},
                  "vision_config": {"model_type": "siglip_vision_model"}, "torch_dtype": "bfloat16"},
    "gemma3_1b": {"architectures": ["Gemma3ForCausalLM"], "head_dim": 256, "hidden_size": 1152,
                  "intermediate_size": 6912, "model_type": "gemma3_text", "num_attention_heads": 4,
                  "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
                  "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
                  "sliding_window_pattern": 6, "vocab_size": 262144},
    "qwen2_5_7b": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
                   "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
                   "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "tie_word_embeddings": False, "use_sliding_window": False,
                   "vocab_size": 152064},
    "qwen3_8b": {"architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_size": 4096,
                 "intermediate_size": 12288, "model_type": "qwen3", "num_attention_heads": 32,
                 "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
                 "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
                 "use_sliding_window": False, "vocab_size": 151936},
}


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_legacy_hub_configs_give_the_presets(name):
  assert hf_config.config_from_hf(LEGACY[name]) == preset(name)


def test_config_errors():
  with pytest.raises(ValueError, match="model_type='llama'"):
    hf_config.config_from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    hf_config.config_from_hf({"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="hidden_act='gelu'"):
    hf_config.config_from_hf({"model_type": "qwen3", "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="cannot express .*attn_logit_softcap"):
    hf_config.config_to_hf(preset("tiny_qwen2").replace(attn_logit_softcap=5.0))


def test_default_token_ids():
  assert hf_config.default_token_ids(preset("gemma2_2b"))["eos_token_id"] == [1, 107]  # <eos>, <end_of_turn>
  assert hf_config.default_token_ids(preset("gemma3_4b"))["eos_token_id"] == [1, 106]
  # <|im_end|>, <|endoftext|>
  assert hf_config.default_token_ids(preset("qwen2_5_7b"))["eos_token_id"] == [151645, 151643]


# ------------------------------------------------------------------------------------------------ weights
@pytest.fixture(scope="module")
def imported(tiny_hf_model):
  cache = {}

  def get(family, scan=False):
    if (family, scan) not in cache:
      cache[family, scan] = hf.load_hf(tiny_hf_model(family), overrides={"scan_layers": scan})
    return cache[family, scan]
  return get


SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


@SCAN
@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_bit_exact(family, scan, tiny_hf_model, imported, tmp_path, tokens_BT):
  folder = tiny_hf_model(family)
  cfg, model = imported(family, scan)
  hf.save_hf(model, cfg, str(tmp_path / "out"), dtype="float32")
  original, exported = _hf_model(folder), _hf_model(str(tmp_path / "out"))
  assert sorted(original.state_dict()) == sorted(exported.state_dict())
  for name, x in original.state_dict().items():
    assert torch.equal(x, exported.state_dict()[name]), name
  tokens = torch.as_tensor(tokens_BT)
  with torch.no_grad():
    np.testing.assert_array_equal(exported(tokens).logits, original(tokens).logits)
  assert set(os.listdir(tmp_path)) == {"out"}  # the temporary folder was renamed


@SCAN
@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_import_is_identity(family, scan, imported, tmp_path):
  cfg, model = imported(family, scan)
  hf.save_hf(nnx.state(model), cfg, str(tmp_path), dtype="float32")
  cfg2, model2 = hf.load_hf(str(tmp_path), overrides={"scan_layers": scan})
  assert cfg2 == cfg
  first, second = _pure(model), _pure(model2)
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_sharded_export_and_bfloat16(imported, tmp_path):
  cfg, model = imported("qwen2")
  out = str(tmp_path / "sharded")
  hf.save_hf(model, cfg, out, dtype="bfloat16", max_shard_size="40KB")
  index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
  sizes = {f: os.path.getsize(os.path.join(out, f)) for f in shards}
  assert max(sizes.values()) < 40_000 + 2 * 128 * 256 * 2  # only a single big tensor may pass the limit
  with safe_open(os.path.join(out, shards[0]), framework="pt") as f:
    assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  _, back = hf.load_hf(out)
  first, second = _pure(model), _pure(back)
  for name in first:  # bfloat16 rounding by torch is the reference
    want = torch.tensor(first[name]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(second[name], want, err_msg=name)
  by_hf = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
  for name, x in _files_tensors(out).items():
    assert by_hf[name].dtype == torch.bfloat16 and torch.equal(by_hf[name], x), name


def test_parse_size():
  assert hf.parse_size("5GB") == 5 * 10**9
  assert hf.parse_size("2GiB") == 2 * 2**30
  assert hf.parse_size("40KB") == 40_000
  assert hf.parse_size(123) == 123
  with pytest.raises(ValueError, match="max_shard_size"):
    hf.parse_size("lots")


def test_generation_config_and_tokenizer_files(imported, tmp_path):
  cfg, model = imported("gemma2")
  tok = tmp_path / "tok"
  tok.mkdir()
  for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    (tok / name).write_text(name)
  (tok / "unrelated.txt").write_text("x")
  out = tmp_path / "out"
  hf.save_hf(model, cfg, str(out), tokenizer_dir=str(tok), generation_config={"eos_token_id": [1, 107]})
  assert json.load(open(out / "generation_config.json")) == {"eos_token_id": [1, 107]}
  assert json.load(open(out / "config.json"))["eos_token_id"] == [1, 107]
  assert (out / "tokenizer.model").read_text() == "tokenizer.model"
  assert not (out / "unrelated.txt").exists()
  assert transformers.GenerationConfig.from_pretrained(str(out)).eos_token_id == [1, 107]


def test_sentencepiece_export_has_a_tokenizer_json_of_our_ids(tmp_path):
  """An export with a SentencePiece tokenizer also gets a tokenizer.json: the `tokenizers` library (and the generic
  fast class) encodes every sample text, chat markers and byte-fallback characters included, to sentencepiece's ids
  and decodes them back; the chat markers are special. (transformers >= 5 AutoTokenizer rebuilds any qwen2 tokenizer
  as byte-level BPE, which no SentencePiece vocabulary survives: load such an export with PreTrainedTokenizerFast.)"""
  import tokenizers as hf_tokenizers
  ours = tokenizers.SentencePieceTokenizer(tokenizers.sample_tokenizer(str(tmp_path / "cache")))
  out = tmp_path / "export"
  out.mkdir()
  hf.write_tokenizer_config(ours, "chatml", str(out))
  (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
  texts = tokenizers.sample_texts() + [" ".join(tokenizers.CHAT_SYMBOLS) + "\n  x\t\u00e9\u65e5 \U0001f600 ~"]
  plain = hf_tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  assert [plain.encode(t, add_special_tokens=False).ids for t in texts] == [ours.encode(t) for t in texts]
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
  assert len(tok) == ours.vocab_size
  assert [tok.decode(ours.encode(t), skip_special_tokens=True) for t in texts] == [
      ours.decode(ours.encode(t)) for t in texts]
  assert tok.convert_tokens_to_ids("<|im_end|>") == ours.token_id("<|im_end|>") and "<|im_end|>" in tok.all_special_tokens


@pytest.mark.parametrize("text_prefix,vision_prefix", [("model.language_model.", "model."),  # transformers >= 4.52
                                                      ("language_model.model.", "")])  # original checkpoints
def test_gemma3_multimodal_names(text_prefix, vision_prefix, tiny_hf_model, imported, tmp_path):
  folder = tiny_hf_model("gemma3")
  text_cfg = json.load(open(os.path.join(folder, "config.json")))
  tensors = {text_prefix + k[len("model."):]: v for k, v in _files_tensors(folder).items()}
  tensors[vision_prefix + "vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
  tensors[vision_prefix + "multi_modal_projector.mm_input_projection_weight"] = torch.zeros(2, 2)
  config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text_cfg}
  cfg, model = hf.load_hf(_copy_with(folder, str(tmp_path / "mm"), tensors, config))
  want_cfg, want = imported("gemma3")
  assert cfg == want_cfg
  first, second = _pure(want), _pure(model)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_load_onto_mesh(tiny_hf_model, imported):
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  cfg, model = hf.load_hf(tiny_hf_model("qwen2"), mesh=mesh, overrides={"remat": "full"})
  assert cfg.remat == "full"
  state = nnx.state(model, nnx.Param)
  want = sharding.state_shardings(state, mesh)
  for (path, var), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
    assert var[...].sharding.is_equivalent_to(spec, var.ndim), path
  q = model.layers[0].attn.q_DNH[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  _, plain = imported("qwen2")
  first, second = _pure(plain), _pure(model)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_load_scanned_onto_mesh(tiny_hf_model, imported):
  """Stacked params: the layers axis unsharded, each device reading only its rows' shards; same values as the
  unrolled import, layer i = row i // period of stack.(i % period)."""
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  cfg, model = hf.load_hf(tiny_hf_model("gemma2"), mesh=mesh, overrides={"scan_layers": True})
  q = model.stack[1].attn.q_DNH[...]
  assert q.shape[0] == 2 and q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  _, plain = imported("gemma2")
  np.testing.assert_array_equal(np.asarray(q[1]), np.asarray(plain.layers[3].attn.q_DNH[...]))
  np.testing.assert_array_equal(np.asarray(model.stack[0].mlp.down_FD[...][0]),
                                np.asarray(plain.layers[0].mlp.down_FD[...]))


def test_cli_import_then_export(tiny_hf_model, sample_sp_path, tmp_path):
  folder = tiny_hf_model("gemma3", vocab_size=1024)
  shutil.copytree(folder, tmp_path / "hf")
  shutil.copy(sample_sp_path, tmp_path / "hf" / "tokenizer.model")
  hf.cli(["import", f"--hf={tmp_path / 'hf'}", f"--out={tmp_path / 'work'}"])
  assert model_config.load_json(str(tmp_path / "work")) == hf_config.config_from_hf(
      json.load(open(os.path.join(folder, "config.json"))))
  assert (tmp_path / "work" / "tokenizer" / "tokenizer.model").exists()
  hf.cli(["export", f"--workdir={tmp_path / 'work'}", f"--out={tmp_path / 'back'}", "--dtype=float32"])
  original, exported = _files_tensors(folder), _files_tensors(str(tmp_path / "back"))
  assert sorted(original) == sorted(exported)
  for name, x in original.items():
    assert torch.equal(x, exported[name]), name
  assert (tmp_path / "back" / "tokenizer.model").exists()
  tok = tokenizers.SentencePieceTokenizer(str(tmp_path / "back" / "tokenizer.model"))
  assert json.load(open(tmp_path / "back" / "generation_config.json")) == {
      "bos_token_id": tok.bos_id, "eos_token_id": [tok.token_id("<end_of_turn>"), tok.eos_id], "pad_token_id": 0}


# ------------------------------------------------------------------------------------------------ errors
def test_missing_tensor(tiny_hf_model, tmp_path):
  folder = tiny_hf_model("qwen3")
  tensors = _files_tensors(folder)
  del tensors["model.layers.2.self_attn.k_norm.weight"]
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model.layers.2.self_attn.k_norm.weight'\].*"
                                       r"model.safetensors"):
    hf.load_hf(_copy_with(folder, str(tmp_path / "m"), tensors))


def test_wrong_shape(tiny_hf_model, tmp_path):
  folder = tiny_hf_model("qwen2")
  tensors = _files_tensors(folder)
  tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(60)
  with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj.bias has shape \(60,\), expected \(64,\)"):
    hf.load_hf(_copy_with(folder, str(tmp_path / "m"), tensors))


def test_unexpected_tensor_and_ignorable_ones(tiny_hf_model, imported, tmp_path):
  folder = tiny_hf_model("gemma2")
  tensors = _files_tensors(folder)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # ignorable
  hf.load_hf(_copy_with(folder, str(tmp_path / "ok"), tensors))
  tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.o_proj.bias'\]"):
    hf.load_hf(_copy_with(folder, str(tmp_path / "bad"), tensors))


def test_unknown_architecture_and_missing_files(tiny_hf_model, tmp_path):
  folder = tiny_hf_model("gemma2")
  config = json.load(open(os.path.join(folder, "config.json")))
  config.update(model_type="mistral", architectures=["MistralForCausalLM"])
  bad = _copy_with(folder, str(tmp_path / "m"), _files_tensors(folder), config)
  with pytest.raises(ValueError, match="model_type='mistral'.*MistralForCausalLM"):
    hf.load_hf(bad)
  os.makedirs(tmp_path / "empty")
  shutil.copy(os.path.join(folder, "config.json"), tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf.load_hf(str(tmp_path / "empty"))
