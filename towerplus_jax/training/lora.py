"""A stage's LoRA (config `lora.*`, adapters from models/lora.py): the adapters put on the loaded model, the frozen
base cast to `lora.base_dtype`, and the base's record (convert/peft.py `lora_base.json`) kept in the run folder and
checked on resume, since a LoRA checkpoint holds the adapters and their optimizer state only."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.convert import peft
from towerplus_jax.models import lora

TRAINABLE = nnx.LoRAParam  # the `trainable` filter of training/state.py under LoRA


def spec(config: ml_collections.ConfigDict) -> lora.Spec | None:
  """The stage's adapters, or None for full fine-tuning (`lora.rank` = 0)."""
  c = config.lora
  if c.rank == 0:
    return None
  if c.dropout:
    raise ValueError(f"config.lora.dropout={c.dropout}: only 0 is implemented (the adapters are merged into the "
                     "weights, models/lora.py)")
  return lora.Spec(c.rank, c.alpha, c.targets)


def adapt(config: ml_collections.ConfigDict, model: nnx.Module) -> nnx.Module:
  """`model` (changed in place) with the stage's adapters and its base weights cast to `lora.base_dtype`; as it is
  for full fine-tuning. Works on an abstract model too (inside `nnx.eval_shape`)."""
  s = spec(config)
  if s is None:
    return model
  lora.apply(model, s, nnx.Rngs(config.train.seed))
  dtype = jnp.dtype(config.lora.base_dtype)
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, lora.BASE)))
  return model


def apply(config: ml_collections.ConfigDict, model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """`adapt` on a model placed on `mesh` (the base is cast where it lies), the adapters placed by their logical
  axes."""
  model = adapt(config, model)
  if spec(config) is not None:
    adapters = nnx.state(model, TRAINABLE)
    nnx.update(model, jax.device_put(adapters, sharding.state_shardings(adapters, mesh)))
  return model


def base_record(config: ml_collections.ConfigDict, model: nnx.Module) -> dict:
  """Where the adapted model's base came from (what export rebuilds it from), its fingerprint and the adapters."""
  c = config.lora
  source = config.init_from or f"random init (model.preset={config.model.preset}, train.seed={config.train.seed})"
  return {"base": source, "init_from": config.init_from, "seed": config.train.seed, "base_dtype": c.base_dtype,
          "rank": c.rank, "alpha": c.alpha, "targets": c.targets,
          "fingerprint": peft.fingerprint(nnx.state(model, lora.BASE))}


def check_base(workdir: str, record: dict) -> None:
  """Raises ValueError (one line) when `workdir` holds adapters trained on another base than `record`'s."""
  saved = peft.read_base(workdir)
  if saved is not None and not peft.same_base(saved, record):
    raise ValueError(f"{workdir} holds LoRA adapters of another base ({saved['base']}, fingerprint "
                     f"{saved['fingerprint']}); this run's base is {record['base']} (fingerprint "
                     f"{record['fingerprint']}): resume with the same init_from and lora.base_dtype, or use a new "
                     "workdir")
