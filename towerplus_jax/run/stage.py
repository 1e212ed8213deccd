"""One stage from its config: everything it needs before its first step, assembled (mesh, tokenizer
(convert/tokenizer_files.py), model and frozen reference params (training/weights.py), batch sources (datasets.py)),
then trained by the loop (training/trainer.py).

  stage.train(config, workdir)   # what `python -m towerplus_jax.main` runs for each stage
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from towerplus_jax import distributed, losses, sharding
from towerplus_jax.config import config_check
from towerplus_jax.convert import peft, tokenizer_files
from towerplus_jax.data import chat
from towerplus_jax.models import config as model_config
from towerplus_jax.models.config import ModelConfig, flops_per_token
from towerplus_jax.run import datasets
from towerplus_jax.training import lora, optim, weights
from towerplus_jax.training import state as state_lib
from towerplus_jax.training.step import StepOptions
from towerplus_jax.training.trainer import BatchSource, LoopOptions, Trainer


@dataclasses.dataclass
class RunSetup:
  mesh: Mesh
  tokenizer: Any
  model_cfg: ModelConfig
  model: nnx.Module
  ref_params: Any  # nnx.State: a frozen copy of the trainable params (under LoRA: the adapters), or None
  batches: BatchSource
  eval_batches: Callable[[], Iterable[dict]] | None
  # Writes the run's model_config.json and tokenizer/ into the workdir: called once the run is known to be valid
  # (after its checkpoint restored, or for a new run before its first step), so that a refused resume changes nothing.
  save_files: Callable[[], None]


def check_vocab(config: ml_collections.ConfigDict, tokenizer, model_cfg: ModelConfig) -> None:
  """Every tokenizer id must have a row in the model's embedding, and (chat data) the template's tokens must exist."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(
        f"config.data.tokenizer={config.data.tokenizer!r} has {tokenizer.vocab_size} ids but the model "
        f"({config.init_from or config.model.preset}) has {model_cfg.vocab_size} embedding rows: use the "
        "checkpoint's own tokenizer (config.data.tokenizer=auto, or sp:PATH / hf:PATH)")
  if datasets.batch_format(config) == "lm":
    return
  try:
    chat.stop_ids(tokenizer, config.data.template)
  except KeyError as e:
    other = next(t for t in chat.TEMPLATES if t != config.data.template)
    raise ValueError(f"config.data.template={config.data.template!r}: {e.args[0]}; set "
                     f"config.data.template={other} (or auto)") from None


def setup(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """Every check a stage's config, data, tokenizer and model allow before its first step; reads the workdir (a resumed
  run's model_config.json) but writes nothing to it (`RunSetup.save_files` does)."""
  distributed.initialize()
  config_check.check_names(config)
  datasets.check_data(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  tokenizer, tokenizer_spec = tokenizer_files.resolve_for_run(config)
  model_cfg, model = weights.load_model(config, mesh, tokenizer.vocab_size)
  weights.check_resume_layout(workdir, model_cfg)
  check_vocab(config, tokenizer, model_cfg)
  model = lora.apply(config, model, mesh)
  base = lora.base_record(config, model) if lora.spec(config) else None
  if base:
    lora.check_base(workdir, base)

  def save_files() -> None:
    if jax.process_count() > 1:  # every host has read the old model_config.json before process 0 rewrites it
      multihost_utils.sync_global_devices("resume layout checked")
    if jax.process_index() == 0:
      model_config.save_json(model_cfg, workdir)
      tokenizer_files.save_for_run(config, tokenizer, tokenizer_spec, workdir)
      if base:
        peft.save_base(workdir, base)

  loss = losses.get(config.loss.name)
  use_reference = loss.needs_reference(config.loss) and not config.data.precomputed_reference
  ref_params = weights.frozen_copy(model, lora.trainable(config)) if use_reference else None
  fmt = datasets.batch_format(config)
  dataset = datasets.dataset_fn(config, tokenizer)
  dcfg = config.data
  global_batch = config.train.global_batch_size

  if fmt == "rl":
    from towerplus_jax.rl.source import RolloutSource  # the RL stack (rewards, COMET) only for RL stages
    batches = RolloutSource(config, tokenizer, dataset(dcfg.train, True, config.rl.prompts_per_step), mesh, workdir)
  else:
    batches = datasets.DatasetBatches(dataset(dcfg.train, True, global_batch))

  eval_batches = None
  if dcfg.eval and fmt != "rl":
    def eval_batches():
      return itertools.islice(iter(dataset(dcfg.eval, False, global_batch)), config.train.eval_steps)
  logging.info("model %s: %s params on mesh %s", model_cfg.family,
               f"{sum(x.size for x in jax.tree.leaves(nnx.state(model))):,}", dict(mesh.shape))
  return RunSetup(mesh, tokenizer, model_cfg, model, ref_params, batches, eval_batches, save_files)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Run (or resume) one stage in `workdir`; returns the last logged metrics. Raises `preemption.Stopped` when a
  signal stopped it early (after saving a checkpoint)."""
  run = setup(config, workdir)
  tx, lr = optim.make(config.optimizer, config.train.steps)
  graphdef, state = state_lib.init(run.model, tx, run.mesh, config.train.seed, reference=run.ref_params,
                                   trainable=lora.trainable(config))
  options = StepOptions(losses.get(config.loss.name), config.loss, tx, lr, config.train.micro_batches)
  trainer = Trainer(graphdef=graphdef, state=state, step_options=options, mesh=run.mesh, batches=run.batches,
                    eval_batches=run.eval_batches, options=LoopOptions.of(config.train), workdir=workdir,
                    flops_per_token=flops_per_token(run.model_cfg, config.data.seq_len), on_restored=run.save_files)
  return trainer.run()
