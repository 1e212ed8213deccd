"""AOT compile check on fake CPU devices (the fallback without libtpu; test_aot_tpu.py has the TPU compiler): the real
train step compiles for a mesh of 8 fake devices from abstract state, and XLA's per-device argument bytes match
params + AdamW moments split 8 ways (hand arithmetic)."""
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs.sft import get_config
from towerplus_jax import sharding
from towerplus_jax.aot import cli, programs
from towerplus_jax.data import formats, packing
from towerplus_jax.models.transformer import abstract_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fsdp8_argument_bytes_are_params_and_moments_over_8():
  config = get_config("tiny")
  cfg = programs.architecture(config)
  report = programs.train_step(config, sharding.make_mesh({"fsdp": 8})).memory
  assert min(report.argument, report.output, report.temp) > 0 and report.total > report.argument
  params = nnx.state(abstract_model(cfg))
  param_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))  # float32
  b, t = config.train.global_batch_size, config.data.seq_len
  batch_bytes = 5 * b * t * 4  # inputs, targets, loss_mask, positions, segment_ids: 4 bytes each
  expected = (3 * param_bytes + batch_bytes) / 8  # params + Adam mu + nu, everything split over fsdp=8
  # Above it only by what stays replicated: norm scales (d floats each) and optimizer counters.
  assert expected <= report.argument <= 1.1 * expected, (report.argument, expected)
  assert report.alias >= 0.9 * 3 * param_bytes / 8  # the donated state is updated in place


def test_cli_compiles_wpo_with_reference_on_fake_devices_and_fails_over_budget():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # --devices alone must give the 8 devices
  out = subprocess.run([sys.executable, "-m", "towerplus_jax.aot", "--config=configs/wpo.py:tiny",
                        "--mesh=data=2,fsdp=4", "--devices=8", "--hbm_gib=0.001", "--json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]  # does not fit -> non-zero exit
  assert "on 8 cpu devices" in out.stdout and "'data': 2, 'fsdp': 4" in out.stdout
  assert "XLA:CPU estimate" in out.stdout and "does NOT fit in 0.001 GiB" in out.stdout
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["fits"] is False and row["peak_gib"] > 0.001 and row["compile_s"] > 0
  assert [p["name"] for p in row["programs"]] == ["train step", "eval step",
                                                  "reference log-probs (towerplus_jax.reference)"]


def test_sweep_reports_a_failed_row_and_returns_false(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  bad = cli.Target("no such config", "configs/nope.py:tiny", "v5e-8")
  assert cli.sweep((bad,), timeout_s=120) is False
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith("| target |") and table[2].startswith("| no such config |")
  assert "failed:" in table[2] and table[2].endswith("| no |")


def test_targets_are_the_production_rows():
  rows = {(t.config, t.topology, t.num_slices) for t in cli.TARGETS}
  assert {("configs/sft.py:gemma2_2b", "v5e-8", 1), ("configs/wpo.py:gemma2_2b", "v5e-8", 1),
          ("configs/grpo.py:gemma2_2b", "v5e-8", 1), ("configs/sft.py:gemma2_9b", "v5e-16", 1),
          ("configs/sft.py:qwen2_5_72b", "v5p-64", 1), ("configs/sft.py:gemma2_2b", "v5e-8", 2)} <= rows
  for family in ("v6e", "v5p"):  # one target per stage on each
    stages = {t.config.split("/")[1].split(".")[0] for t in cli.TARGETS if t.topology.startswith(family)}
    assert stages == {"cpt", "sft", "wpo", "grpo"}, family
  lora = {(t.config, t.topology): t.overrides for t in cli.TARGETS if "--config.lora.rank=16" in t.overrides}
  assert set(lora) == {("configs/sft.py:gemma2_9b", "v5e-8"), ("configs/grpo.py:gemma2_9b", "v5e-8"),
                       ("configs/sft.py:qwen2_5_72b", "v6e-16"), ("configs/sft.py:qwen2_5_72b", "v6e-8")}
  assert "--config.lora.base_dtype=int8" in lora["configs/sft.py:qwen2_5_72b", "v6e-8"]


def test_bad_mesh_flag_names_the_entry():
  with pytest.raises(ValueError, match="fsdp:8"):
    cli.parse_mesh("fsdp:8", {"data": 1})
  assert cli.parse_mesh("fsdp=8, tensor=2", {"data": 1, "fsdp": -1}) == {"data": 1, "fsdp": 8, "tensor": 2}


def test_grpo_with_iterations_compiles_the_old_logps_layout():
  """μ > 1 batches carry old_logps [B, T] and the scalar old_is_current (replicated), as the rollout source yields."""
  from configs import grpo
  config = grpo.get_config("tiny")
  config.rl.iterations = 2
  batch = programs.abstract_batch(config, sharding.make_mesh({"fsdp": -1}))
  assert batch["old_logps"].shape == batch["inputs"].shape and batch["old_logps"].dtype == "float32"
  assert batch["old_is_current"].shape == () and batch["old_is_current"].sharding.spec == jax.sharding.PartitionSpec()


def test_packed_preference_step_compiles_for_the_largest_bucket():
  """data.pack=True (configs/wpo.py's default): the compiled train step takes the packed rows, as many as the largest
  bucket in multiples of batch devices x micro-batches (a step whose pairs each fill a row of their own), and the
  per-pair fields [rows, pair slots]."""
  from configs import wpo
  config = wpo.get_config("tiny")
  config.train.update(global_batch_size=12, micro_batches=2)
  mesh = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
  rows, t = packing.row_buckets(12, 4 * 2)[-1], config.data.seq_len
  assert config.data.pack and rows == 16 < 2 * 12  # each pair one row: half the unpacked rows, rounded to a bucket
  step = programs.train_step(config, mesh).compiled
  batch = step.args_info[0][1]  # (state, batch): the batch's ArgInfos
  assert set(batch) == set(formats.PREFERENCE.packed.required) | {"record_index"}
  assert all(batch[k].shape == (rows, t) for k in formats.ROW) and batch["record_index"].shape == (rows, 12)


def test_packed_grpo_step_compiles_for_the_largest_bucket():
  """GRPO with data.pack=True: the compiled train step takes packed rollout rows (per-token advantages, a completion
  index per slot), at most a row per completion."""
  from configs import grpo
  config = grpo.get_config("tiny")
  config.data.pack = True
  mesh = sharding.make_mesh({"fsdp": 4}, jax.devices()[:4])
  n, t = config.train.global_batch_size, programs.prompt_len(config) + config.rl.max_completion_len
  rows = packing.sequence_buckets(n, 4)[-1]
  batch = programs.train_step(config, mesh).compiled.args_info[0][1]
  assert set(batch) == set(formats.RL.packed.required)
  assert batch["advantages"].shape == (rows, t) and batch["completion_index"].shape == (rows, min(n, t))
