"""The batch contract: each format's check names the field a batch gets wrong; the producers (pipeline, rollout
rows, the AOT check's abstract batch) agree with it; the train loop stops at a bad first batch before jit."""
import numpy as np
import pytest

from configs import sft, wpo
from towerplus_jax import losses
from towerplus_jax.aot import programs
from towerplus_jax.convert import tokenizer_files
from towerplus_jax.data import formats
from towerplus_jax.rl import rollout
from towerplus_jax.run import chain, datasets


def lm_batch(b=2, t=4) -> dict:
  return {"inputs": np.ones((b, t), np.int32), "targets": np.ones((b, t), np.int32),
          "loss_mask": np.ones((b, t), np.float32), "positions": np.zeros((b, t), np.int32),
          "segment_ids": np.ones((b, t), np.int32), "num_examples": np.ones(b, np.int32)}


@pytest.mark.parametrize("change,expected", [
    (lambda b: b.pop("targets"), "lm batch: missing field(s) ['targets']"),
    (lambda b: b.update(loss_mask=b["loss_mask"].astype(np.int32)),
     "lm batch: field 'loss_mask' is int32 [2, 4]; the format wants float32 [B, T]"),
    (lambda b: b.update(positions=b["positions"][0]), "lm batch: field 'positions' is int32 [4]; the format wants"),
    (lambda b: b.update(segment_ids=b["segment_ids"][:, :3]),
     "lm batch: field 'segment_ids' has T=3 where earlier fields have T=4"),
    (lambda b: b.update(advantages=np.zeros(2, np.float32)), "lm batch: unknown field(s) ['advantages']"),
])
def test_check_names_the_field(change, expected):
  formats.LM.check(lm_batch())
  batch = lm_batch()
  change(batch)
  with pytest.raises(ValueError) as e:
    formats.LM.check(batch)
  assert str(e.value).startswith(expected)


def test_every_loss_names_a_format_and_reads_its_reference_fields():
  for name in losses.names():
    loss = losses.get(name)
    assert loss.batch_format is formats.get(loss.batch_format.name)
    assert set(loss.reference_keys) <= set(loss.batch_format.fields) - set(loss.batch_format.required)
  assert losses.get("wpo").batch_format is formats.PREFERENCE and losses.get("grpo").reference_keys == ("ref_logps",)


@pytest.mark.parametrize("logprobs", [False, True])
def test_rollout_rows_are_rl_rows(logprobs):
  b, p, c = 3, 4, 5
  rng = np.random.default_rng(0)
  rows = rollout.training_rows(rng.integers(1, 9, (b, p)), np.array([2, 4, 3]), rng.integers(1, 9, (b, c)),
                               np.array([5, 1, 0]), rng.normal(size=(b, c)) if logprobs else None,
                               np.array([1.0, 0.0, 1.0]), pad_id=0)
  formats.RL.check({**rows, "advantages": np.zeros(b, np.float32)})
  assert ("old_logps" in rows) == logprobs


@pytest.mark.parametrize("module", [sft, wpo])
def test_aot_abstract_batch_is_the_pipelines_batch(module, sample_tok):
  """What the AOT check compiles for is what the train step gets: the pipeline's first batch, counts popped."""
  config = module.get_config("tiny")
  config.train.global_batch_size = 4
  config.data.template = tokenizer_files.resolve_template(config)
  batch = next(iter(datasets.dataset_fn(config, sample_tok)(config.data.train, True, 4)))
  losses.get(config.loss.name).batch_format.check(batch)
  real = {k: (np.shape(v), np.dtype(v.dtype)) for k, v in batch.items() if k not in formats.DATA_COUNTS}
  assert real == {k: (shape, np.dtype(dt)) for k, (shape, dt) in programs.batch_fields(config).items()}


def test_train_loop_stops_at_a_bad_first_batch_naming_the_field(tmp_path, monkeypatch):
  def bad_batch(self, policy):
    batch = next(self.data_iter)
    return {**batch, "loss_mask": batch["loss_mask"].astype(np.int32)}
  monkeypatch.setattr(datasets.DatasetBatches, "next", bad_batch)
  config = sft.get_config("tiny")
  config.data.eval = ""
  with pytest.raises(ValueError, match=r"^sft batch: field 'loss_mask' is int32 \[8, 128\]; the format wants "
                                       r"float32 \[B, T\]$"):
    chain.run(config, str(tmp_path / "run"))
