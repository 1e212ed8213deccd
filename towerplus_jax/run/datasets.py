"""A stage's datasets from its config: the batch format its loss reads, the dataset factory of `pipeline`, and the
batch source the train loop checkpoints."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from towerplus_jax import losses, sharding
from towerplus_jax.data import pipeline
from towerplus_jax.data.sources import open_source, resolve_sources


def batch_format(config: ml_collections.ConfigDict) -> str:
  """The name of the stage's batch format (formats.FORMATS): the one its loss reads."""
  return losses.get(config.loss.name).batch_format.name


# What records each batch format reads (data/records.py), as the error names them.
WANTS = {"lm": '{"text"}, chat ({"messages"} / {"prompt","completion"}) or parallel ({"source","reference"})',
         "sft": 'chat ({"messages"} / {"prompt","completion"}) or parallel ({"source","reference"})',
         "preference": '{"prompt","chosen","rejected"}', "rl": '{"prompt"} or parallel ({"source","reference"})'}
REFERENCE_FIELDS = ("ref_chosen_logp", "ref_rejected_logp")


def _fits(fmt: str, record: dict) -> bool:
  """Whether a record is of the kind batch format `fmt` reads (its fields' values are checked later, per record)."""
  if fmt == "preference":
    return "chosen" in record or "rejected" in record
  if fmt == "rl":
    return "prompt" in record or pipeline.is_parallel(record)
  conversation = pipeline.is_chat(record) or pipeline.is_parallel(record)
  return conversation or (fmt == "lm" and "text" in record)


def check_data(config: ml_collections.ConfigDict) -> None:
  """The data of config.data.train / data.eval exists and is of the kind the stage's loss reads, judged by the first
  record of each part of the spec (files only; tfds/seqio are opened by the pipeline): one line naming the keys,
  before anything is written. Also, data.precomputed_reference=True needs records with the reference log-probs."""
  fmt = batch_format(config)
  for key in ("train",) if fmt == "rl" else ("train", "eval"):  # rl has no eval batches
    spec = config.data[key]
    for part in filter(None, (p.strip() for p in spec.split(","))):
      if part.startswith(("tfds:", "seqio:")):
        continue
      source = open_source(resolve_sources(part)[:1])  # a missing / empty file: one line naming it
      record = source[0]
      if not isinstance(record, dict):
        continue  # the pipeline names it
      where = f"{source.locate(0)} has keys {sorted(record)}"
      if not _fits(fmt, record):
        hint = "; pick the loss of that data" if fmt != "preference" else (
            " (write pairs, or use --config.loss.name=sft on chat/parallel data)")
        raise ValueError(f"config.loss.name={config.loss.name} needs {fmt} data ({WANTS[fmt]}) but "
                         f"config.data.{key}={spec!r} is not: {where}{hint}")
      if (fmt == "preference" and key == "train" and config.data.get("precomputed_reference")
          and not all(k in record for k in REFERENCE_FIELDS)):
        raise ValueError(f"config.data.precomputed_reference=True needs {' and '.join(REFERENCE_FIELDS)} in every "
                         f"record of config.data.train, but {where}: write them with python -m "
                         "towerplus_jax.reference (or set --config.data.precomputed_reference=False)")


def dataset_fn(config: ml_collections.ConfigDict, tokenizer) -> Callable[[str, bool, int], Any]:
  """(sources spec, is_train, global batch size) -> grain dataset of the stage's batch format; eval/inference
  datasets keep record order and run once."""
  dcfg = config.data

  def dataset(spec: str, train_split: bool, batch_size: int):
    return pipeline.make_dataset(
        batch_format(config), resolve_sources(spec), tokenizer, seq_len=dcfg.seq_len, batch_size=batch_size,
        template=dcfg.template, seed=dcfg.seed, shuffle=train_split, repeat=train_split, pack=dcfg.pack,
        max_prompt_len=dcfg.max_prompt_len or None,
        row_multiple=batch_devices(config) * config.train.get("micro_batches", 1))  # each micro-batch split evenly
  return dataset


def batch_devices(config: ml_collections.ConfigDict) -> int:
  """How many devices the batch is split over: the product of the mesh's batch axes (sharding.make_mesh's; the data
  axis spans the slices)."""
  slices = config.mesh.get("slices", 1)
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(config.mesh), jax.device_count() // slices)))
  return slices * math.prod(shape[a] for a in sharding.BATCH)


class DatasetBatches:
  """Global batches from a grain dataset; get_state/set_state (JSON) are what the checkpoint saves."""

  def __init__(self, dataset):
    self.data_iter = iter(dataset)

  def next(self, policy: Callable[[], nnx.Module]) -> dict:
    """The next batch (data does not depend on the policy)."""
    del policy
    return next(self.data_iter)

  def host_metrics(self) -> dict[str, float]:
    return {}

  def get_state(self) -> dict:
    return {"iterator": self.data_iter.get_state()}

  def set_state(self, state: dict) -> None:
    self.data_iter.set_state(state["iterator"])
