"""Where a stage's model weights come from (config.init_from): a random init of a preset, an HF folder or another
run's checkpoint (in either layer layout, model.scan_layers; a LoRA run's merged, or its base when a LoRA stage
continues its adapter), each placed straight onto the mesh; the layer layout a
resumed run must keep; and the frozen copy a loss with a reference model compares against."""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx, traverse_util
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.config import config_check
from towerplus_jax.convert import hf, hf_config, peft
from towerplus_jax.files import checkpoint
from towerplus_jax.models import config as model_config
from towerplus_jax.models import layout
from towerplus_jax.models.config import ModelConfig, preset
from towerplus_jax.models.transformer import Transformer, abstract_model
from towerplus_jax.training import lora


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The ModelConfig fields a stage config sets on top of the preset / saved architecture."""
  return {k: config.model[k] for k in model_config.RUNTIME_FIELDS}


def load_model(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int) -> tuple[ModelConfig, nnx.Module]:
  """Random init from a preset, or weights from an HF folder / another stage's workdir (in either layer layout),
  placed on the mesh; with init_from, a config.model.preset naming another model is warned about."""
  if not config.init_from:
    cfg = preset(config.model.preset).replace(**model_overrides(config),
                                              vocab_size=config.model.vocab_size or _round_up(vocab_size, 128))
    return cfg, new_model(cfg, mesh, config.train.seed)
  kind, path = config_check.init_source(config.init_from)
  if kind == "peft":  # the adapter's base; training/lora.py puts the adapter on it
    kind, path = "hf", peft.read_adapter(path)[1]
  source = hf_config.config_from_folder(path) if kind == "hf" else model_config.load_json(path)
  warn_ignored_preset(config, source)
  if kind == "hf":
    return hf.load_hf(path, mesh=mesh, overrides=model_overrides(config))
  cfg = source.replace(**model_overrides(config))
  continued = lora.continued_run(config)
  if continued:  # a LoRA run whose adapter this stage continues: its base (training/lora.py adds the adapter)
    return cfg, hf.lora_base(continued[1], cfg, mesh)
  return cfg, restore_model(cfg, mesh, os.path.join(path, "checkpoints"), saved=source)


# configs/*.py's model.preset without a config argument (their get_config's default arg): one no one asked for.
DEFAULT_PRESET = "tiny"
SIZE_FIELDS = ("family", "embed_dim", "mlp_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def warn_ignored_preset(config: ml_collections.ConfigDict, source: ModelConfig) -> None:
  """One warning line when config.model.preset, ignored because init_from gives the architecture (`source`), names
  another model (family or sizes). Silent for the configs' default preset (`tiny`: no preset was asked for) and for a
  preset that agrees (as in a chain whose later stages start from the previous stage of the same preset)."""
  name = config.model.preset
  if name == DEFAULT_PRESET:
    return
  ours = preset(name)
  differ = [k for k in SIZE_FIELDS if getattr(ours, k) != getattr(source, k)]
  if differ:
    shown = ", ".join(f"{k}={getattr(source, k)!r} (preset: {getattr(ours, k)!r})" for k in differ)
    logging.warning("config.model.preset=%s is ignored: config.init_from=%s gives the architecture, %s", name,
                    config.init_from, shown)


def new_model(cfg: ModelConfig, mesh: Mesh, seed: int) -> Transformer:
  return sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)


def restore_model(cfg: ModelConfig, mesh: Mesh, ckpt_dir: str, step: int | None = None,
                  saved: ModelConfig | None = None) -> nnx.Module:
  """A model of `cfg` with the params of a run's checkpoint, restored onto the mesh in `cfg`'s param_dtype.
  `saved`: the config the checkpoint was written with (default `cfg`); when its layer layout differs (scan_layers),
  the params are restored in that layout, sharded on the mesh, then moved into `cfg`'s (`_relayout`). A LoRA run's
  checkpoint (adapters only) gives its base with its adapters merged in (convert/hf.py `run_model`)."""
  workdir = os.path.dirname(ckpt_dir.rstrip("/"))
  if peft.read_base(workdir):
    return hf.run_model(workdir, cfg, mesh, step)
  stored_cfg = cfg.replace(scan_layers=(saved or cfg).scan_layers)
  stored = nnx.state(abstract_model(stored_cfg))
  target = checkpoint.abstract_like(nnx.to_pure_dict(stored), nnx.to_pure_dict(sharding.state_shardings(stored, mesh)))
  params = checkpoint.restore_params(ckpt_dir, target, step)
  graphdef, abstract = nnx.split(abstract_model(cfg))
  if not layout.same_layout(stored_cfg, cfg):
    params = _relayout(params, stored_cfg, cfg, nnx.to_pure_dict(sharding.state_shardings(abstract, mesh)))
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)


def _relayout(params: dict, src: ModelConfig, dst: ModelConfig, shardings: dict) -> dict:
  """`params` (a pure dict on the mesh in `src`'s layer layout) in `dst`'s layout, on `shardings`. One block param
  at a time: a jitted `layout.convert` of that param of every layer, after which its inputs are deleted, so the
  devices hold one copy of the model plus one param of every layer, never two copies. Consumes `params`."""
  flat, flat_shardings = traverse_util.flatten_dict(params), traverse_util.flatten_dict(shardings)

  def of(tree: dict, name: tuple) -> dict:  # the layer entries of one block param (path `name` inside a block)
    return traverse_util.unflatten_dict({k: v for k, v in tree.items() if k[0] in layout.LAYER_KEYS and k[2:] == name})

  out = {k: v for k, v in flat.items() if k[0] not in layout.LAYER_KEYS}
  for name in sorted({k[2:] for k in flat if k[0] in layout.LAYER_KEYS}):  # sorted: the same order on every host
    part = of(flat, name)
    moved = jax.jit(lambda p: layout.convert(p, src, dst), out_shardings=of(flat_shardings, name))(part)
    out.update(traverse_util.flatten_dict(moved))
    kept = {id(x) for x in jax.tree.leaves(moved)}  # a leftover layer's param, should jit pass it through as is
    for x in jax.tree.leaves(part):
      if id(x) not in kept:
        x.delete()
  return traverse_util.unflatten_dict(out)


def check_resume_layout(workdir: str, cfg: ModelConfig) -> None:
  """A run resumed in `workdir` must be of the model its checkpoints hold (the architecture in its
  model_config.json; only the runtime fields may change) and keep their layer layout (train state is restored as
  saved). Reads only: nothing in the workdir changes before the resume is known to be valid."""
  folder = epath.Path(workdir)
  steps = folder / "checkpoints"
  if not (folder / "model_config.json").exists() or not (
      steps.exists() and any(p.name.isdigit() for p in steps.iterdir())):
    return
  saved = model_config.load_json(workdir)
  theirs, ours = dataclasses.asdict(saved), dataclasses.asdict(cfg)
  differ = [k for k in theirs if k not in model_config.RUNTIME_FIELDS and theirs[k] != ours.get(k)]
  if differ:
    shown = "; ".join(f"{k}={theirs[k]!r} there, {ours.get(k)!r} here" for k in differ[:3])
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise ValueError(f"{workdir} holds checkpoints of another model than this config gives ({shown}{more}): resume "
                     "it with the config that started it (same model.preset / init_from / tokenizer), or start a new "
                     "--workdir")
  if saved.scan_layers != cfg.scan_layers:
    raise ValueError(f"{workdir} holds checkpoints of model.scan_layers={saved.scan_layers}; resume it with "
                     f"--config.model.scan_layers={saved.scan_layers} (or start a new workdir with "
                     f"init_from=ckpt:{workdir})")


def frozen_copy(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param) -> nnx.State:
  """A copy of the model's trainable params (with the frozen rest, the reference model of DPO/WPO/GRPO), untouched by
  the policy's updates."""
  params = nnx.state(model, trainable)
  return jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p))(params)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k
