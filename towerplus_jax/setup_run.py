"""Everything a stage needs before its first step: mesh, tokenizer, model (random, from HF or from another stage),
frozen reference params, and the batch sources. Kept apart from the loop in `train.py`."""
from __future__ import annotations

import dataclasses
import glob
import itertools
import os
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from towerplus_jax import checkpoint, distributed, losses, sharding
from towerplus_jax.convert import hf
from towerplus_jax.data import chat, pipeline, tokenizers
from towerplus_jax.models import config as model_config, layout
from towerplus_jax.models.config import ModelConfig, preset
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.rl import rollout

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "data", "sample")
DATA_KIND = {"lm": "lm", "sft": "sft", "dpo": "preference", "wpo": "preference", "grpo": "rl"}


class DatasetBatches:
  """Global batches from a grain dataset; get_state/set_state (JSON) are what the checkpoint saves."""

  def __init__(self, dataset):
    self.data_iter = iter(dataset)

  def __next__(self) -> dict:
    return next(self.data_iter)

  def host_metrics(self) -> dict[str, float]:
    return {}

  def get_state(self) -> dict:
    return {"iterator": self.data_iter.get_state()}

  def set_state(self, state: dict) -> None:
    self.data_iter.set_state(state["iterator"])


@dataclasses.dataclass
class RunSetup:
  mesh: Mesh
  tokenizer: Any
  model_cfg: ModelConfig
  model: nnx.Module
  ref_params: Any  # nnx.State of a frozen reference model, or None
  batches: Callable[[Callable[[], nnx.Module]], Any]  # policy getter -> batch source (next(), get/set_state)
  eval_batches: Callable[[], Iterable[dict]] | None


def resolve_sources(spec: str) -> list[str]:
  """Comma-separated paths, globs, `sample:NAME` (a file shipped in towerplus_jax/data/sample), tfds:/seqio: specs."""
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    if part.startswith("sample:"):
      out.append(os.path.join(SAMPLE_DIR, part[len("sample:"):] + ".jsonl"))
    elif part.startswith(("tfds:", "seqio:")) or not any(c in part for c in "*?["):
      out.append(part)
    else:
      out.extend(sorted(glob.glob(part)) or [part])
  return out


def _init_dir(init_from: str) -> tuple[str, str]:
  kind, _, path = init_from.partition(":")
  if kind not in ("hf", "ckpt") or not path:
    raise ValueError(f"config.init_from={init_from!r}: use '', 'hf:/path/to/hf_folder' or 'ckpt:/path/to/workdir'")
  return kind, path


def check_names(config: ml_collections.ConfigDict) -> None:
  """The names a run resolves (model preset, init_from) fail with one clear line before anything is written."""
  if config.init_from and config.init_from != "previous":  # previous: a chained stage (configs/tower_plus.py)
    _init_dir(config.init_from)
  else:
    preset(config.model.preset)


def _init_folders(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
  """(init_from's tokenizer folder, its kind) or None for a random init."""
  if not config.init_from:
    return None
  kind, path = _init_dir(config.init_from)
  return (path if kind == "hf" else os.path.join(path, "tokenizer")), kind


def resolve_template(config: ml_collections.ConfigDict) -> str:
  """config.data.template, 'auto' resolved: the chat template of init_from's tokenizer folder when it has one, else
  the model family's (gemma for Gemma, chatml for Qwen)."""
  if config.data.template != "auto":
    return config.data.template
  found = _init_folders(config)
  if found and hf.template_in(found[0]):
    return hf.template_in(found[0])
  if not found:
    family = preset(config.model.preset).family
  elif found[1] == "hf":
    family = hf.config_from_hf(hf._read_json(os.path.join(found[0], "config.json"))).family
  else:
    family = model_config.load_json(os.path.dirname(found[0])).family
  return chat.family_template(family)


def check_vocab(config: ml_collections.ConfigDict, tokenizer, model_cfg: ModelConfig) -> None:
  """Every tokenizer id must have a row in the model's embedding, and (chat data) the template's tokens must exist."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(
        f"config.data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} ids but the model "
        f"({config.init_from or config.model.preset}) has {model_cfg.vocab_size} embedding rows: use the "
        "checkpoint's own tokenizer (config.data.tokenizer=auto, or sp:PATH / hf:PATH)")
  if data_kind(config) == "lm":
    return
  try:
    chat.stop_ids(tokenizer, config.data.template)
  except KeyError as e:
    other = next(t for t in chat.TEMPLATES if t != config.data.template)
    raise ValueError(f"config.data.template={config.data.template!r}: {e.args[0]}; set "
                     f"config.data.template={other} (or auto)") from None


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """config.data.tokenizer: 'sample' | 'sp:PATH' | 'hf:PATH' | 'auto' (init_from's folder; the sample tokenizer for
  a random-init tiny preset); a copy of its files goes to WORKDIR/tokenizer so that export and evaluation find it.
  Resolves config.data.template='auto' in place (the pipeline and rollouts read it)."""
  config.data.template = resolve_template(config)
  spec = config.data.tokenizer
  if spec == "auto":
    found = _init_folders(config)
    if found and any((epath.Path(found[0]) / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
      spec = tokenizer_spec(found[0])
    elif config.model.preset.startswith("tiny"):
      spec = "sample"
    else:
      raise ValueError("config.data.tokenizer='auto' needs config.init_from (hf:DIR or ckpt:WORKDIR); with a random "
                       "init set config.data.tokenizer=sample, sp:PATH or hf:PATH")
  if spec == "sample":
    tok_path = tokenizers.sample_tokenizer(os.path.join(os.path.expanduser("~"), ".cache", "towerplus_jax"))
    spec = f"sp:{tok_path}"
  kind, _, path = spec.partition(":")
  names = {"sp": "sentencepiece", "hf": "hf"}
  if kind not in names:
    raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r}: use sample, sp:PATH, hf:PATH or auto")
  tok = tokenizers.load_tokenizer(names[kind], path)
  if jax.process_index() == 0:
    dst, src = epath.Path(workdir) / "tokenizer", epath.Path(path)
    dst.mkdir(parents=True, exist_ok=True)
    src.copy(dst / ("tokenizer.model" if kind == "sp" else "tokenizer.json"), overwrite=True)
    for name in hf.TOKENIZER_FILES:
      if name not in ("tokenizer.model", "tokenizer.json") and (src.parent / name).exists():
        (src.parent / name).copy(dst / name, overwrite=True)
    hf.write_tokenizer_config(tok, config.data.template, str(dst))  # the run's chat template travels to an export
  return tok


def tokenizer_in(folder: str):
  """The tokenizer saved in a run's `tokenizer/` folder or shipped in an HF folder."""
  kind, _, path = tokenizer_spec(folder).partition(":")
  return tokenizers.load_tokenizer({"sp": "sentencepiece", "hf": "hf"}[kind], path)


def tokenizer_spec(folder: str) -> str:
  for kind, name in (("sp", "tokenizer.model"), ("hf", "tokenizer.json")):
    if (epath.Path(folder) / name).exists():
      return f"{kind}:{os.path.join(folder, name)}"
  raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {folder}")


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  return {k: config.model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention", "attention_block")}


def load_model(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int) -> tuple[ModelConfig, nnx.Module]:
  """Random init from a preset, or weights from an HF folder / another stage's workdir, placed on the mesh."""
  if not config.init_from:
    cfg = preset(config.model.preset).replace(**model_overrides(config),
                                              vocab_size=config.model.vocab_size or _round_up(vocab_size, 128))
    return cfg, new_model(cfg, mesh, config.train.seed)
  kind, path = _init_dir(config.init_from)
  if kind == "hf":
    return hf.load_hf(path, mesh=mesh, overrides=model_overrides(config))
  saved = model_config.load_json(path)
  cfg = saved.replace(**model_overrides(config))
  return cfg, restore_model(cfg, mesh, os.path.join(path, "checkpoints"), saved=saved)


def restore_model(cfg: ModelConfig, mesh: Mesh, ckpt_dir: str, step: int | None = None,
                  saved: ModelConfig | None = None) -> nnx.Module:
  """A model of `cfg` with the params of a run's checkpoint, restored straight onto the mesh. `saved`: the config
  the checkpoint was written with (default `cfg`); its layers are converted when `scan_layers` differs."""
  saved = saved or cfg
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
  stored = nnx.state(nnx.eval_shape(lambda: Transformer(saved, rngs=nnx.Rngs(0))))
  target = checkpoint.abstract_like(nnx.to_pure_dict(stored), nnx.to_pure_dict(sharding.state_shardings(stored, mesh)))
  params = layout.convert(checkpoint.restore_params(ckpt_dir, target, step), saved, cfg)
  nnx.replace_by_pure_dict(abstract, jax.device_put(params, shardings))
  return nnx.merge(graphdef, abstract)


def check_resume_layout(workdir: str, cfg: ModelConfig) -> None:
  """A run resumed in `workdir` must keep its checkpoints' layer layout (train state is restored as saved)."""
  folder = epath.Path(workdir)
  steps = folder / "checkpoints"
  if not (folder / "model_config.json").exists() or not (
      steps.exists() and any(p.name.isdigit() for p in steps.iterdir())):
    return
  saved = model_config.load_json(workdir).scan_layers
  if saved != cfg.scan_layers:
    raise ValueError(f"{workdir} holds checkpoints of model.scan_layers={saved}; resume it with "
                     f"--config.model.scan_layers={saved} (or start a new workdir with init_from=ckpt:{workdir})")


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _frozen_copy(model: nnx.Module):
  params = nnx.state(model)
  return jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p))(params)


def data_kind(config: ml_collections.ConfigDict) -> str:
  return DATA_KIND.get(config.loss.name, config.data.kind)


def dataset_fn(config: ml_collections.ConfigDict, tokenizer) -> Callable[[str, bool, int], Any]:
  """(sources spec, is_train, global batch size) -> grain dataset of the stage's batch format; eval/inference
  datasets keep record order and run once."""
  dcfg = config.data

  def dataset(spec: str, train_split: bool, batch_size: int):
    return pipeline.make_dataset(
        data_kind(config), resolve_sources(spec), tokenizer, seq_len=dcfg.seq_len, batch_size=batch_size,
        template=dcfg.template, seed=dcfg.seed, shuffle=train_split, repeat=train_split, pack=dcfg.pack,
        max_prompt_len=dcfg.max_prompt_len or None)
  return dataset


def setup_run(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  distributed.initialize()
  check_names(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  tokenizer = load_tokenizer(config, workdir)
  model_cfg, model = load_model(config, mesh, tokenizer.vocab_size)
  check_resume_layout(workdir, model_cfg)
  check_vocab(config, tokenizer, model_cfg)
  if jax.process_count() > 1:  # every host has read the old model_config.json before process 0 rewrites it
    multihost_utils.sync_global_devices("resume layout checked")
  if jax.process_index() == 0:
    model_config.save_json(model_cfg, workdir)
  loss = losses.get(config.loss.name)
  use_reference = loss.needs_reference(config.loss) and not config.data.precomputed_reference
  ref_params = _frozen_copy(model) if use_reference else None
  kind = data_kind(config)
  dataset = dataset_fn(config, tokenizer)
  dcfg = config.data
  global_batch = config.train.global_batch_size

  def batches(policy: Callable[[], nnx.Module]):
    if kind == "rl":
      prompts = dataset(dcfg.train, True, config.rl.prompts_per_step)
      return rollout.RolloutBatches(config, tokenizer, prompts, policy, mesh, workdir)
    return DatasetBatches(dataset(dcfg.train, True, global_batch))

  eval_batches = None
  if dcfg.eval and kind != "rl":
    def eval_batches():
      return itertools.islice(iter(dataset(dcfg.eval, False, global_batch)), config.train.eval_steps)
  logging.info("model %s: %s params on mesh %s", model_cfg.family,
               f"{sum(x.size for x in jax.tree.leaves(nnx.state(model))):,}", dict(mesh.shape))
  return RunSetup(mesh, tokenizer, model_cfg, model, ref_params, batches, eval_batches)


def new_model(cfg: ModelConfig, mesh: Mesh, seed: int) -> Transformer:
  return sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)

