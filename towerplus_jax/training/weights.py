"""Where a stage's model weights come from (config.init_from): a random init of a preset, an HF folder or another
run's checkpoint, each placed straight onto the mesh; the layer layout a resumed run must keep; and the frozen copy
a loss with a reference model compares against."""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.config import config_check
from towerplus_jax.convert import hf
from towerplus_jax.files import checkpoint
from towerplus_jax.models import config as model_config
from towerplus_jax.models import layout
from towerplus_jax.models.config import ModelConfig, preset
from towerplus_jax.models.transformer import Transformer, abstract_model


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The ModelConfig fields a stage config sets on top of the preset / saved architecture."""
  return {k: config.model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention", "attention_block")}


def load_model(config: ml_collections.ConfigDict, mesh: Mesh, vocab_size: int) -> tuple[ModelConfig, nnx.Module]:
  """Random init from a preset, or weights from an HF folder / another stage's workdir, placed on the mesh."""
  if not config.init_from:
    cfg = preset(config.model.preset).replace(**model_overrides(config),
                                              vocab_size=config.model.vocab_size or _round_up(vocab_size, 128))
    return cfg, new_model(cfg, mesh, config.train.seed)
  kind, path = config_check.init_source(config.init_from)
  if kind == "hf":
    return hf.load_hf(path, mesh=mesh, overrides=model_overrides(config))
  saved = model_config.load_json(path)
  cfg = saved.replace(**model_overrides(config))
  return cfg, restore_model(cfg, mesh, os.path.join(path, "checkpoints"), saved=saved)


def new_model(cfg: ModelConfig, mesh: Mesh, seed: int) -> Transformer:
  return sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)


def restore_model(cfg: ModelConfig, mesh: Mesh, ckpt_dir: str, step: int | None = None,
                  saved: ModelConfig | None = None) -> nnx.Module:
  """A model of `cfg` with the params of a run's checkpoint, restored straight onto the mesh. `saved`: the config
  the checkpoint was written with (default `cfg`); its layers are converted when `scan_layers` differs."""
  saved = saved or cfg
  graphdef, abstract = nnx.split(abstract_model(cfg))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
  stored = nnx.state(abstract_model(saved))
  target = checkpoint.abstract_like(nnx.to_pure_dict(stored), nnx.to_pure_dict(sharding.state_shardings(stored, mesh)))
  params = layout.convert(checkpoint.restore_params(ckpt_dir, target, step), saved, cfg)
  nnx.replace_by_pure_dict(abstract, jax.device_put(params, shardings))
  return nnx.merge(graphdef, abstract)


RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "attention_block", "scan_layers")  # not the weights'


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
  differ = [k for k in theirs if k not in RUNTIME_FIELDS and theirs[k] != ours.get(k)]
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


def frozen_copy(model: nnx.Module) -> nnx.State:
  """A copy of the model's params (the reference model of DPO/WPO/GRPO), untouched by the policy's updates."""
  params = nnx.state(model)
  return jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p))(params)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k
