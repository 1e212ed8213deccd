"""Checkpointer: params + train state + data (grain iterator state as JSON) round-trip, keep-N, restore onto another mesh, SIGTERM flag."""
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.files import checkpoint
from towerplus_jax.training import preemption
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer


def test_roundtrip_with_iterator_and_keep_n(tmp_path):
  ds = grain.MapDataset.range(100).shuffle(seed=3).batch(4)
  it = iter(ds)
  for _ in range(3):
    next(it)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  train_item = {"step": jnp.asarray(3), "rng": jax.random.key_data(jax.random.key(7))}
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_every=1)
  for step in (1, 2, 3):
    ckpt.save(step, params, train_item, {"iterator": it.get_state(), "rollouts": step})
  ckpt.wait()
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 3]
  expected_next = [next(it) for _ in range(2)]

  fresh = iter(ds)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, train_item))
  out = ckpt.restore(3, abstract[0], abstract[1], data=True)
  ckpt.close()
  assert out["data"]["rollouts"] == 3
  fresh.set_state(out["data"]["iterator"])
  np.testing.assert_array_equal(out["params"]["w"], params["w"])
  np.testing.assert_array_equal(out["train"]["rng"], train_item["rng"])
  for want in expected_next:
    np.testing.assert_array_equal(next(fresh), want)


def test_restore_onto_another_mesh(tmp_path):
  cfg = ModelConfig.tiny("qwen3")
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(1))
  mesh_a = sharding.make_mesh({"fsdp": 8})
  model = sharding.create_sharded(make, mesh_a)
  pure = nnx.to_pure_dict(nnx.state(model))
  checkpoint.save_params(str(tmp_path), pure)

  mesh_b = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  abstract = nnx.state(nnx.eval_shape(make))
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh_b))
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract), shardings)
  restored = checkpoint.restore_params(str(tmp_path), target)
  q = restored["layers"][0]["attn"]["q_DNH"]
  assert q.sharding.spec == P(None, "tensor", None) and q.sharding.mesh.shape["tensor"] == 4
  for a, b in zip(jax.tree.leaves(pure), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stop_signal_flag():
  stop = preemption.StopSignal()
  try:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
  finally:
    stop.restore_handlers()


def test_unrolled_checkpoint_restores_into_scanned_model(tmp_path):
  """Gemma 3 with 8 layers (period 6: one stacked group + 2 unrolled) saved unrolled, restored scanned onto a mesh
  (and back): the same forward logits, the stacked params sharded by their logical axes."""
  from towerplus_jax.training import weights
  base = ModelConfig.tiny("gemma3")
  unrolled = base.replace(num_layers=8, layer_types=("sliding",) * 5 + ("full", "sliding", "sliding"))
  scanned = unrolled.replace(scan_layers=True)
  model = Transformer(unrolled, rngs=nnx.Rngs(2))
  checkpoint.save_params(str(tmp_path / "a"), nnx.to_pure_dict(nnx.state(model)))
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  restored = weights.restore_model(scanned, mesh, str(tmp_path / "a"), saved=unrolled)
  assert restored.stack[0].attn.q_DNH.shape[0] == 1 and len(restored.tail) == 2
  assert restored.stack[0].attn.q_DNH[...].sharding.spec == P(None, "fsdp", "tensor", None)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, base.vocab_size)
  want = np.asarray(model(tokens))
  np.testing.assert_allclose(np.asarray(restored(tokens)), want, atol=1e-5)
  checkpoint.save_params(str(tmp_path / "b"), nnx.to_pure_dict(nnx.state(restored)))
  back = weights.restore_model(unrolled, mesh, str(tmp_path / "b"), saved=scanned)
  np.testing.assert_allclose(np.asarray(back(tokens)), want, atol=1e-5)


def test_resume_with_another_layer_layout_is_named(tmp_path):
  from towerplus_jax.models import config as model_config
  from towerplus_jax.training import weights
  cfg = ModelConfig.tiny("qwen3")
  model_config.save_json(cfg, str(tmp_path))
  weights.check_resume_layout(str(tmp_path), cfg.replace(scan_layers=True))  # no checkpoints yet: a fresh start
  os.makedirs(tmp_path / "checkpoints")  # created before the first save: a run that died before step 1
  weights.check_resume_layout(str(tmp_path), cfg.replace(scan_layers=True))
  os.makedirs(tmp_path / "checkpoints" / "3")
  weights.check_resume_layout(str(tmp_path), cfg)
  with pytest.raises(ValueError, match=r"model.scan_layers=False; resume it with --config.model.scan_layers=False"):
    weights.check_resume_layout(str(tmp_path), cfg.replace(scan_layers=True))


def _saved_steps(directory, steps=(1, 2, 3)):
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=5, save_every=1, async_save=False)
  for s in steps:
    ckpt.save(s, {"w": jnp.full((64,), float(s))}, {"step": jnp.asarray(s)}, {"rollouts": s})
  ckpt.close()
  return jax.ShapeDtypeStruct((64,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, damage):
  w, step = _saved_steps(tmp_path)
  data_files = [p for p in (tmp_path / "3" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
  for p in data_files:
    if damage == "truncate":
      p.write_bytes(p.read_bytes()[:7])
    else:
      p.unlink()
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, save_every=1)
  restored, out = ckpt.restore_latest({"w": w}, {"step": step}, data=True)
  assert restored == 2 and out["data"]["rollouts"] == 2 and float(out["params"]["w"][0]) == 2.0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3.unreadable"]  # set aside, not deleted
  assert ckpt.latest_step() == 2
  ckpt.save(3, {"w": jnp.full((64,), 9.0)}, {"step": jnp.asarray(3)}, {"rollouts": 3}, force=True)  # step 3 again
  ckpt.close()


def test_no_restorable_step_raises_naming_the_folder_and_renames_nothing(tmp_path):
  _saved_steps(tmp_path, steps=(1, 2))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5)
  wrong = jax.ShapeDtypeStruct((65,), jnp.float32)  # e.g. the model changed: no step fits
  with pytest.raises(ValueError, match=rf"^{tmp_path}: no checkpoint restores \(steps \[2, 1\]\); step 2: "):
    ckpt.restore_latest({"w": wrong})
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_save_killed_midway_is_never_restored(tmp_path):
  """Orbax writes a step into a temporary folder and renames it when complete: a kill -9 leaves only the tmp."""
  w, step = _saved_steps(tmp_path, steps=(1,))
  partial = tmp_path / "2.orbax-checkpoint-tmp-1763900000000000"
  (partial / "params").mkdir(parents=True)
  (partial / "params" / "manifest.ocdbt").write_bytes(b"\0\1")
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5)
  restored, _ = ckpt.restore_latest({"w": w}, {"step": step})
  ckpt.close()
  assert restored == 1


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  """After a kill -9 the run resumes from its last checkpoint: the rows logged past it (a torn one too) are dropped."""
  from towerplus_jax.training import metrics_writer
  path = tmp_path / "metrics.jsonl"
  rows = "".join(f'{{"step": {s}, "loss": {s / 10}}}\n' for s in (10, 20, 30, 40))
  path.write_text(rows + '{"step": 50, "lo')  # the kill tore the last row mid-write
  writer = metrics_writer.MetricsWriter(str(tmp_path), 100, 0.0, resume_step=20)
  writer.write(30, {"loss": 0.25})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(10, 1.0), (20, 2.0), (30, 0.25)]
