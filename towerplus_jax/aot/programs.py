"""Every program a stage runs, lowered and compiled from abstract state for a mesh (nothing is allocated), with the
compiler's per-chip memory analysis and what else the stage holds on the chip while each one runs.

Programs: the train step (with the frozen reference when the loss needs one), the eval step (data stages), the
GRPO rollout sampler (prefill + decode loop over the KV cache, one program) and, with rl.iterations > 1, the old
log-probs forward pass; for preference losses also `towerplus_jax.reference`'s precompute (its own process).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import losses, sharding
from towerplus_jax.data import formats, packing
from towerplus_jax.models.config import ModelConfig, preset
from towerplus_jax.models.transformer import Transformer
from towerplus_jax.run import datasets
from towerplus_jax.training import lora, optim, weights
from towerplus_jax.training import state as state_lib
from towerplus_jax.training import step as step_lib
from towerplus_jax.training.state import TrainState
from towerplus_jax.training.step import StepOptions

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-chip bytes of one compiled executable (the compiler's memory analysis)."""

  argument: int
  output: int
  alias: int  # outputs written into donated arguments (counted once)
  temp: int

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> MemoryReport:
    m = compiled.memory_analysis()
    if m is None:
      raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis of compiled executables")
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program of a stage and the chip memory it needs."""

  name: str
  compiled: jax.stages.Compiled
  memory: MemoryReport
  held: int  # bytes per chip the stage keeps while it runs that are not its arguments (optimizer state, reference)
  lower_seconds: float  # tracing and lowering to StableHLO
  seconds: float  # the XLA compile
  own_process: bool = False  # runs in a process of its own (towerplus_jax.reference), not beside the training state

  @property
  def peak(self) -> int:
    return self.memory.total + self.held


@dataclasses.dataclass(frozen=True)
class AbstractStage:
  """A stage's model, optimizer and train state as sharded shapes (`jax.ShapeDtypeStruct`s with their shardings)."""

  cfg: ModelConfig
  graphdef: nnx.GraphDef
  state: TrainState  # as the train step takes it (the reference inside when the loss needs one)
  options: StepOptions


def architecture(config: ml_collections.ConfigDict) -> ModelConfig:
  """The stage's architecture: its preset with the config's vocab size, dtypes and remat policy."""
  cfg = preset(config.model.preset)
  return cfg.replace(vocab_size=config.model.vocab_size or cfg.vocab_size, **weights.model_overrides(config))


def chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded shapes (the largest shard of each leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_stage(config: ml_collections.ConfigDict, mesh: Mesh) -> AbstractStage:
  """The train state as training lays it out on `mesh` (training/state.py)."""
  cfg = architecture(config)
  tx, lr = optim.make(config.optimizer, config.train.steps)
  loss = losses.get(config.loss.name)
  uses_reference = loss.needs_reference(config.loss) and not config.data.precomputed_reference
  model = nnx.eval_shape(lambda: lora.adapt(config, Transformer(cfg, rngs=nnx.Rngs(0))))
  # LoRA: the adapters train, and the reference is a copy of the adapters on the same frozen base
  graphdef, state = state_lib.abstract(model, tx, mesh, reference=uses_reference, trainable=lora.trainable(config))
  return AbstractStage(cfg, graphdef, state, StepOptions(loss, config.loss, tx, lr, config.train.micro_batches))


def batch_fields(config: ml_collections.ConfigDict, batch_devices: int | None = None
                 ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of every array of one global batch of the stage's batch format as the step receives it (the
  data counts popped). `batch_devices`: the devices the batch is split over (default: the run's, from config.mesh);
  packed preference rows come in multiples of them times train.micro_batches."""
  fmt = losses.get(config.loss.name).batch_format
  sizes = {"B": config.train.global_batch_size, "T": config.data.seq_len}
  optional = ["record_index"]  # preference rows carry their record's index
  if config.data.precomputed_reference:
    optional += fmt.reference
  if fmt is formats.RL:
    sizes["T"] = prompt_len(config) + config.rl.max_completion_len
    optional += ["old_logps", "old_is_current"] if config.rl.iterations > 1 else []
  if fmt in (formats.PREFERENCE, formats.RL) and config.data.pack:
    sizes["B"] = packed_rows(config, batch_devices or datasets.batch_devices(config), fmt)
    sizes["P"] = packing.pair_slots(config.train.global_batch_size, config.data.seq_len)
    sizes["S"] = packing.sequence_slots(config.train.global_batch_size, sizes["T"])
    fmt = fmt.packed
  return fmt.abstract(sizes, optional)


def packed_rows(config: ml_collections.ConfigDict, batch_devices: int, fmt: formats.BatchFormat) -> int:
  """Rows of the packed preference (GRPO) step the check compiles: the largest bucket (packing.row_buckets /
  sequence_buckets), what a step of global_batch_size pairs (completions) takes when no two of them share a row. The
  compiled program is then the run's largest step, so a stage that fits here fits at any fill; a step of shorter
  examples takes a smaller bucket (fewer rows, less memory). The bucket at an expected fill would be the common
  step, but one batch of long examples would then need more memory than was checked."""
  multiple = batch_devices * config.train.micro_batches  # each micro-batch split evenly over the devices
  buckets = packing.row_buckets if fmt is formats.PREFERENCE else packing.sequence_buckets
  return buckets(config.train.global_batch_size, multiple)[-1]


def prompt_len(config: ml_collections.ConfigDict) -> int:
  """Prompt tokens per rollout row (the prompt dataset pads to this)."""
  return config.data.max_prompt_len or config.data.seq_len // 2


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as sharded shapes (split over the batch axes, as `sharding.shard_global_batch` does)."""
  spec = lambda shape: sharding.batch_spec(len(shape), mesh, shape[0]) if shape else P()
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec(shape)))
          for k, (shape, dt) in batch_fields(config, math.prod(mesh.shape[a] for a in sharding.BATCH)).items()}


def _compile(name: str, lower: Callable[[], jax.stages.Lowered], mesh: Mesh, held: int = 0,
             own_process: bool = False) -> Program:
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
  return Program(name, compiled, MemoryReport.of(compiled), held, lowered_at - start,
                 time.perf_counter() - lowered_at, own_process)


def train_step(config: ml_collections.ConfigDict, mesh: Mesh, stage: AbstractStage | None = None) -> Program:
  """The stage's train step as the trainer jits it (training/step.py: state donated, its shardings kept)."""
  stage = stage or abstract_stage(config, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, stage.state)
  step = step_lib.jit_train_step(stage.graphdef, stage.options, shardings)
  return _compile("train step", lambda: step.lower(stage.state, abstract_batch(config, mesh)), mesh)


def compile_stage(config: ml_collections.ConfigDict, mesh: Mesh) -> list[Program]:
  """Every program the stage runs, each with what the stage holds besides its arguments while it runs."""
  from towerplus_jax.evaluate import sampler  # the RL stack only for RL stages
  stage = abstract_stage(config, mesh)
  loss = losses.get(config.loss.name)
  params = nnx.merge_state(stage.state.params, stage.state.frozen)  # the whole model (LoRA: adapters + base)
  reference = stage.state.reference
  besides_params = chip_bytes((stage.state.opt_state, stage.state.step, stage.state.rng))
  ref_bytes = chip_bytes(reference) if reference is not None else 0
  batch = abstract_batch(config, mesh)
  programs = [train_step(config, mesh, stage)]
  if loss.batch_format is formats.RL:
    c = config.rl
    rows = c.prompts_per_step * c.num_generations
    programs.append(_compile(
        "rollout sampler (prefill + decode loop)",
        lambda: sampler.lower(stage.graphdef, params, rows, prompt_len(config), mesh=mesh,
                              max_new_tokens=c.max_completion_len, top_k=c.top_k, top_p=c.top_p),
        mesh, besides_params + ref_bytes))
    if c.iterations > 1:
      from towerplus_jax.losses import grpo
      keys = ("inputs", "targets", "positions", "segment_ids")
      logps = jax.jit(lambda p, b: grpo.policy_logps(nnx.merge(stage.graphdef, p), b, config.loss),
                      out_shardings=NamedSharding(mesh, P()))
      programs.append(_compile("old log-probs (rl.iterations > 1)",
                               lambda: logps.lower(params, {k: batch[k] for k in keys}), mesh,
                               besides_params + ref_bytes))
  else:
    eval_step = jax.jit(step_lib.make_eval_step(stage.graphdef, dataclasses.replace(stage.options, micro_batches=1)))
    programs.append(_compile("eval step", lambda: eval_step.lower(stage.state, batch), mesh, besides_params))
  if loss.batch_format is formats.PREFERENCE and loss.reference_fn is not None:
    ref_batch = {k: v for k, v in batch.items() if k not in loss.reference_keys}
    precompute = jax.jit(lambda p, b: loss.reference_fn(nnx.merge(stage.graphdef, p), b, config.loss))
    programs.append(_compile("reference log-probs (towerplus_jax.reference)",
                             lambda: precompute.lower(params, ref_batch), mesh, own_process=True))
  return programs
