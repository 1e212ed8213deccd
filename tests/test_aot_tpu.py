"""The real TPU compiler without a TPU (libtpu's compile-only devices, `pip install -e '.[tpu]'`): slice names, Mosaic
splash kernels and the accelerator matmul form in TPU programs, every program of a stage with what it holds,
multislice (only the gradient reduction crosses slices), the CLI's report and exit codes, and tpu_run.sh's
pre-flight refusing a run that does not fit."""
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import grpo, sft, wpo
from towerplus_jax import sharding
from towerplus_jax.aot import programs, topology
from towerplus_jax.models import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or platform.machine() != "x86_64",
    reason="libtpu (the TPU compiler) is installed by the tpu extra on x86-64 Linux only")


@pytest.mark.parametrize("name,slices,grid,chips,accelerator,budget", [
    ("v5e-16", 1, (4, 4), 16, "v5litepod-16", 15), ("v5litepod-8", 1, (2, 4), 8, "v5litepod-8", 15),
    ("v5e-1", 1, (1, 1), 1, "v5litepod-1", 15), ("v6e-8", 1, (2, 4), 8, "v6e-8", 31),
    ("v5p-64", 1, (2, 4, 4), 32, "v5p-64", 94), ("v5p-8", 1, (2, 2, 1), 4, "v5p-8", 94),
    ("v4-32", 1, (2, 2, 4), 16, "v4-32", 31), ("v5e:4x4", 1, (4, 4), 16, "v5litepod-16", 15),
    ("v5e-8", 2, (2, 4), 16, "v5litepod-8", 15), ("V6E-256", 1, (16, 16), 256, "v6e-256", 31)])
def test_slice_names(name, slices, grid, chips, accelerator, budget):
  t = topology.parse(name, slices)
  assert (t.grid, t.chips, t.accelerator_type, t.budget_gib) == (grid, chips, accelerator, budget)


@pytest.mark.parametrize("name,slices,message", [
    ("v9x-8", 1, "unknown TPU type; known: v4-N, v5e-N"), ("tpu", 1, "unknown TPU type"),
    ("v5e-12", 1, "a v5e slice has 1, 4, 8, 16, 32, 64, 128, 256 chips, not 12"),
    ("v5p-6", 1, "TensorCores, not 6"), ("v4-7", 1, "N must be even"),
    ("v5e:4x4x4", 1, "a v5e chip grid has 2 axes"), ("v5e-8", 0, "--num_slices=0: must be >= 1")])
def test_bad_slice_names_are_one_line(name, slices, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    topology.parse(name, slices)


def test_missing_libtpu_names_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=re.escape("pip install -e '.[tpu]'")):
    topology.require_libtpu()


def _mesh(name: str, sizes: dict, slices: int = 1) -> jax.sharding.Mesh:
  return sharding.make_mesh({**sizes, "slices": slices}, topology.devices(topology.parse(name, slices)))


@needs_libtpu
def test_tpu_step_has_mosaic_splash_and_the_accelerator_matmul_and_its_memory():
  config = sft.get_config("tiny")
  mesh = _mesh("v5e:2x2", {"fsdp": 4})
  with jax.set_mesh(mesh):
    assert sharding.platform() == "tpu" and attention.resolve("auto", softcap=None, dtype="float32",
                                                              head_dim=64) == "splash"
  program = programs.train_step(config, mesh)
  text = program.compiled.as_text()
  assert "tpu_custom_call" in text  # splash attention as Mosaic kernels, not interpret mode (a plain XLA loop)
  state = programs.abstract_stage(config, mesh).state
  params_bytes = programs.chip_bytes(state.params)
  assert 3 * params_bytes <= program.memory.argument <= 1.1 * 3 * params_bytes + 2 ** 20  # params + Adam moments
  assert program.memory.temp > 0 and program.peak == program.memory.total
  with jax.set_mesh(sharding.make_mesh({"fsdp": 8})):  # a CPU mesh keeps the XLA reference
    assert sharding.platform() == "cpu"
    assert attention.resolve("auto", softcap=None, dtype="float32", head_dim=64) == "xla"


@needs_libtpu
def test_grpo_programs_and_what_the_stage_holds_besides_each():
  config = grpo.get_config("tiny")
  config.rl.iterations, config.loss.beta = 2, 0.04  # old log-probs pass; a frozen reference in memory
  mesh = _mesh("v5e:2x2", {"fsdp": 4})
  compiled = programs.compile_stage(config, mesh)
  assert [p.name for p in compiled] == ["train step", "rollout sampler (prefill + decode loop)",
                                        "old log-probs (rl.iterations > 1)"]
  stage = programs.abstract_stage(config, mesh)
  held = programs.chip_bytes((stage.state.opt_state, stage.state.step, stage.state.rng))
  held += programs.chip_bytes(stage.state.reference)
  train, sample, old = compiled
  assert train.held == 0 and sample.held == old.held == held > 0
  assert sample.peak == sample.memory.total + held
  assert re.search(r"\bwhile\(", sample.compiled.as_text())  # the decode loop
  rows = config.rl.prompts_per_step * config.rl.num_generations
  cache = rows * 2 * (programs.prompt_len(config) + config.rl.max_completion_len) * stage.cfg.num_layers * \
      stage.cfg.num_kv_heads * stage.cfg.head_dim * 4 / 4  # k and v, float32, split over 4 chips
  assert sample.memory.temp >= cache  # the KV cache lives in the sampler's temporaries


@needs_libtpu
def test_wpo_programs_include_the_reference_precompute_in_its_own_process():
  """configs/wpo.py packs pairs (data.pack=True): every program takes the packed rows (test_aot.py: their count)."""
  compiled = programs.compile_stage(wpo.get_config("tiny"), _mesh("v5e:2x2", {"fsdp": 4}))
  assert [(p.name, p.own_process) for p in compiled] == [
      ("train step", False), ("eval step", False), ("reference log-probs (towerplus_jax.reference)", True)]
  assert compiled[1].held > 0 and compiled[2].held == 0
  batches = [p.compiled.args_info[0][-1] for p in compiled]  # (state or params, batch)
  assert all("inputs" in b and "chosen_inputs" not in b and len(b["record_index"].shape) == 2 for b in batches)


def _cross_slice(text: str) -> list[str]:
  """The transfer type of every collective between slices (the TPU compiler lowers them to megascale transfers)."""
  return re.findall(r'_xla_megascale_transfer_type="(\w+)"', text)


@needs_libtpu
def test_two_slices_exchange_only_the_gradient_reduction():
  config = sft.get_config("tiny")
  config.train.global_batch_size = 16
  mesh = _mesh("v5e:2x2", {"fsdp": 4}, slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]  # data rows = slices
  text = programs.train_step(config, mesh).compiled.as_text()
  assert re.search(r"all-gather\(", text)  # fsdp gathers weights, inside each slice
  crossing = _cross_slice(text)
  assert crossing and set(crossing) == {"ALL_REDUCE"}
  # Control: fsdp spanning both slices would gather weights between them.
  devices = topology.devices(topology.parse("v5e:2x2", 2))
  wide = jax.sharding.Mesh(np.asarray(devices).reshape(1, 8, 1), sharding.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert "ALL_GATHER" in _cross_slice(programs.train_step(config, wide).compiled.as_text())


@needs_libtpu
def test_mesh_and_slice_counts_must_agree():
  devices = topology.devices(topology.parse("v5e:2x2", 2))
  with pytest.raises(ValueError, match=re.escape("config.mesh.slices=1 but the 8 devices form 2 slice(s)")):
    sharding.make_mesh({"fsdp": -1}, devices)
  with pytest.raises(ValueError, match="does not divide 4 devices"):
    sharding.make_mesh({"fsdp": 3, "slices": 2}, devices)


def _aot(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "towerplus_jax.aot", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


@needs_libtpu
def test_cli_report_over_budget_exits_1_with_the_knob_and_writes_hlo(tmp_path):
  hlo = tmp_path / "step.hlo"
  out = _aot("--config=configs/sft.py:tiny", "--topology=v5e:2x2", "--hbm_gib=0.001", f"--hlo_out={hlo}", "--json")
  assert out.returncode == 1, out.stderr[-3000:]
  assert "TPU v5 lite: 4 chips, v5litepod-4 (v5e:2x2)" in out.stdout and "libtpu 0." in out.stdout
  assert "does NOT fit in 0.001 GiB" in out.stdout and "to fit: " in out.stdout
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["fits"] is False and [p["name"] for p in row["programs"]] == ["train step", "eval step"]
  assert row["peak_gib"] == max(p["peak_gib"] for p in row["programs"]) > 0.001
  assert "tpu_custom_call" in hlo.read_text() and (tmp_path / "step.hlo.eval_step.txt").exists()


@needs_libtpu
@pytest.mark.parametrize("args,message", [
    (["--topology=v5x-8"], "error: --topology=v5x-8: unknown TPU type; known: v4-N"),
    (["--topology=v5e:2x2", "--mesh=fsdp=3"], "error: mesh {'data': 1, 'fsdp': 3, 'tensor': 1} does not divide 4 "
     "devices"),
    (["--devices=8", "--num_slices=2"], "error: --num_slices=2 needs --topology"),
    (["--topology=v5e-8", "--config.mesh.slicez=2"], "error: --config.mesh.slicez: no such key"),
    ([], "error: --topology=NAME (the TPU compiler) or --devices=N (a CPU estimate) is required")])
def test_cli_bad_input_is_one_line_and_exit_2(args, message):
  out = _aot("--config=configs/sft.py:tiny", *args)
  assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
  assert message in out.stderr and "Traceback" not in out.stderr


@needs_libtpu
def test_tpu_run_preflight_refuses_a_run_that_does_not_fit(tmp_path):
  from test_launch import run_tpu
  proc, calls = run_tpu(tmp_path, "--name=tower", "--project=p", "--zone=z", "--accelerator-type=v5litepod-4",
                        "--create", "--config=configs/sft.py:tiny", "--workdir=gs://b/run", "--hbm-gib=0.001",
                        "--", "--config.train.steps=5", PREFLIGHT_PYTHON=sys.executable)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "does NOT fit in 0.001 GiB" in proc.stdout + proc.stderr
  assert "pre-flight: configs/sft.py:tiny does not fit v5litepod-4" in proc.stderr
  assert not [c for c in calls if {"create", "scp", "ssh"} & set(c)]
