"""A stage's datasets from its config: the batch format its loss reads, the dataset factory of `pipeline`, and the
batch source the train loop checkpoints."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from towerplus_jax import losses
from towerplus_jax.data import pipeline
from towerplus_jax.data.sources import resolve_sources


def batch_format(config: ml_collections.ConfigDict) -> str:
  """The name of the stage's batch format (formats.FORMATS): the one its loss reads."""
  return losses.get(config.loss.name).batch_format.name


def dataset_fn(config: ml_collections.ConfigDict, tokenizer) -> Callable[[str, bool, int], Any]:
  """(sources spec, is_train, global batch size) -> grain dataset of the stage's batch format; eval/inference
  datasets keep record order and run once."""
  dcfg = config.data

  def dataset(spec: str, train_split: bool, batch_size: int):
    return pipeline.make_dataset(
        batch_format(config), resolve_sources(spec), tokenizer, seq_len=dcfg.seq_len, batch_size=batch_size,
        template=dcfg.template, seed=dcfg.seed, shuffle=train_split, repeat=train_split, pack=dcfg.pack,
        max_prompt_len=dcfg.max_prompt_len or None)
  return dataset


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
