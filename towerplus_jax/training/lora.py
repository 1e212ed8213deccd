"""A stage's LoRA (config `lora.*`, adapters from models/lora.py): the adapters put on the loaded model (fresh, or
continued: a PEFT folder's with `init_from=peft:DIR`, a LoRA run's with `init_from=ckpt:RUN`; their rank, alpha and
modules then rule), the frozen base stored as `lora.base_dtype` (bf16, or quantised: QLoRA), and the base's record
(convert/peft.py `lora_base.json`) kept in the run folder and checked on resume, since a LoRA checkpoint holds the
adapters and their optimizer state only."""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.convert import hf, peft
from towerplus_jax.models import config as model_config
from towerplus_jax.models import layout, lora

TRAINABLE = nnx.LoRAParam  # the `trainable` filter of training/state.py under LoRA


def trainable(config: ml_collections.ConfigDict) -> type[nnx.Param]:
  """The stage's `trainable` filter (training/state.py): the adapters under LoRA, else every param."""
  return TRAINABLE if spec(config) is not None else nnx.Param


def adapter_folder(config: ml_collections.ConfigDict) -> str | None:
  """The PEFT adapter folder a stage continues (`init_from=peft:DIR`), or None."""
  kind, _, path = (config.init_from or "").partition(":")
  return path if kind == "peft" else None


def continued_run(config: ml_collections.ConfigDict) -> tuple[str, dict] | None:
  """(workdir, base record) of the LoRA run whose adapter a LoRA stage continues on the same base (`init_from=ckpt:`
  such a run, `lora.rank` > 0; with rank 0 the stage fully fine-tunes the run's merged weights), or None."""
  kind, _, path = (config.init_from or "").partition(":")
  record = peft.read_base(path) if kind == "ckpt" and config.lora.rank else None
  return (path, record) if record else None


def spec(config: ml_collections.ConfigDict) -> lora.Spec | None:
  """The stage's adapters (a continued adapter's own: `init_from=peft:DIR` or a LoRA run's), or None for full
  fine-tuning (`lora.rank` = 0)."""
  c = config.lora
  if c.dropout:
    raise ValueError(f"config.lora.dropout={c.dropout}: only 0 is implemented (models/lora.py)")
  continued, folder = continued_run(config), adapter_folder(config)
  if continued:
    s = lora.Spec(continued[1]["rank"], continued[1]["alpha"], continued[1]["targets"])
    if c.rank != s.rank:
      raise ValueError(f"config.lora.rank={c.rank}, but init_from={config.init_from} is a LoRA run of rank {s.rank}: "
                       f"set lora.rank={s.rank} to continue its adapter, or 0 to fine-tune its merged weights")
    return s
  if folder is None:
    return None if c.rank == 0 else lora.Spec(c.rank, c.alpha, c.targets)
  s, _ = peft.read_adapter(folder)
  if c.rank not in (0, s.rank):
    raise ValueError(f"config.lora.rank={c.rank}, but init_from=peft:{folder} is an adapter of rank {s.rank}: set "
                     f"lora.rank={s.rank} (or 0: the adapter's)")
  return s


def adapt(config: ml_collections.ConfigDict, model: nnx.Module) -> nnx.Module:
  """`model` (changed in place) with the stage's adapters and its base weights cast to `lora.base_dtype`; as it is
  for full fine-tuning. Works on an abstract model too (inside `nnx.eval_shape`)."""
  s = spec(config)
  if s is None:
    return model
  lora.apply(model, s, nnx.Rngs(config.train.seed))
  return lora.store_base(model, config.lora.base_dtype)


def apply(config: ml_collections.ConfigDict, model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """`adapt` on a model placed on `mesh`, the adapters (and a quantised base's new arrays) placed by their logical
  axes."""
  model = adapt(config, model)
  if spec(config) is not None:
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
  folder, continued = adapter_folder(config), continued_run(config)
  if folder:
    peft.load_adapter(folder, model, mesh)
  if continued:
    _load_run_adapter(*continued, model, mesh)
  return model


def _load_run_adapter(workdir: str, record: dict, model: nnx.Module, mesh: Mesh) -> None:
  """Set `model`'s adapters to those of a LoRA run's latest checkpoint (in either layer layout), in place."""
  saved = model_config.load_json(workdir)
  _, adapters = hf.lora_adapters(workdir, record, saved.replace(param_dtype=model.cfg.param_dtype), mesh, None)
  state = nnx.state(model, TRAINABLE)
  nnx.replace_by_pure_dict(state, layout.convert(adapters, saved, model.cfg))
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))


def base_record(config: ml_collections.ConfigDict, model: nnx.Module) -> dict:
  """Where the adapted model's base came from (what export rebuilds it from), its fingerprint and the adapters."""
  c, s, continued = config.lora, spec(config), continued_run(config)
  source = config.init_from or f"random init (model.preset={config.model.preset}, train.seed={config.train.seed})"
  origin = {"base": source, "init_from": config.init_from, "seed": config.train.seed}
  if continued:  # the continued run's base
    origin = {k: continued[1][k] for k in origin}
  return {**origin, "base_dtype": c.base_dtype,
          "rank": s.rank, "alpha": s.alpha, "targets": s.targets,
          "fingerprint": peft.fingerprint(nnx.state(model, lora.BASE))}


def check_base(workdir: str, record: dict) -> None:
  """Raises ValueError (one line) when `workdir` holds adapters trained on another base than `record`'s."""
  saved = peft.read_base(workdir)
  if saved is not None and not peft.same_base(saved, record):
    raise ValueError(f"{workdir} holds LoRA adapters of another base ({saved['base']}, fingerprint "
                     f"{saved['fingerprint']}); this run's base is {record['base']} (fingerprint "
                     f"{record['fingerprint']}): resume with the same init_from and lora.base_dtype, or use a new "
                     "workdir")
