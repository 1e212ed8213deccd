"""Real multi-process runs (2 processes x 4 CPU devices over a localhost coordinator, gloo collectives) against the
same runs in this process (1 x 8 devices): the same model, metrics, samples and checkpoints whatever the host count.

One 2-process launch covers SFT -> WPO (packed pairs) -> GRPO, a resume of a 1-process checkpoint and the end-of-stage
held-out evaluation; a second (through launch/local_run.sh --processes=2) covers SIGTERM to one process. Children run
in their own process group and are always killed at the end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import multihost_worker
import numpy as np
import portpicker
import pytest
from flax import nnx

from towerplus_jax import sharding
from towerplus_jax.data import sources
from towerplus_jax.models import config as model_config
from towerplus_jax.run import chain, stage
from towerplus_jax.training import weights

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # the shared test machine may be busy: generous, still bounded
STAGES = ("sft", "wpo", "grpo")

pytestmark = pytest.mark.slow


def child_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()  # the test session's compilation cache stays (conftest.py)
         if not k.startswith(("XLA_", "JAX_", "TOWERPLUS_")) or k.startswith(("JAX_COMPILATION_", "JAX_PERSISTENT_"))}
  env.update({"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
              "TOWERPLUS_HEARTBEAT_TIMEOUT": "30", **extra})
  return env


def kill_group(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()


def run_processes(jobs: list[dict], tmp_path: Path, n: int = 2, started: int | None = None,
                  expect_ok: bool = True, timeout_s: float = TIMEOUT_S, **env_extra: str) -> tuple[list[int], str]:
  """The worker in n processes (only the first `started` of them launched); (exit codes, logs). With `expect_ok`,
  fails with the logs when any exits non-zero; a run past `timeout_s` fails in any case."""
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  started = n if started is None else started
  procs, logs = [], [tmp_path / f"p{i}.log" for i in range(started)]
  try:
    for i in range(started):
      env = child_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i), **env_extra)
      with open(logs[i], "w") as log:
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "multihost_worker.py"), json.dumps(jobs)],
                                      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.time() + timeout_s
    codes = [p.wait(timeout=max(deadline - time.time(), 1)) for p in procs]
  finally:
    for p in procs:
      kill_group(p)
  tails = "\n".join(f"--- p{i}\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
  assert not expect_ok or codes == [0] * started, tails
  return codes, tails


def final_params(workdir: Path) -> list[np.ndarray]:
  cfg = model_config.load_json(str(workdir))
  model = weights.restore_model(cfg, sharding.make_mesh({}, jax.devices()[:1]), str(workdir / "checkpoints"))
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


def max_diff(a: Path, b: Path) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(final_params(a), final_params(b)))


def keep_until(workdir: Path, step: int) -> None:
  """Drop the checkpoints after `step` (as if the run had stopped there)."""
  for d in (workdir / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > step:
      shutil.rmtree(d)


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"one": 1-process stages, "two": 2-process stages, "one_to_two": 1-process SFT step-2 checkpoint continued by
  2 processes, "two_to_one": the reverse, "heldout_two": the 1-process GRPO checkpoint evaluated by 2 processes
  (one/grpo/eval: by 1 process)}, with the rows each process scored / decoded per call."""
  tmp = tmp_path_factory.mktemp("multihost")
  one, two = tmp / "one", tmp / "two"
  multihost_worker.SCORED.clear()
  one_results = chain.run(multihost_worker.stages_config(), str(one))
  one_scored = list(multihost_worker.SCORED)
  shutil.copytree(one / "sft", tmp / "one_to_two")
  keep_until(tmp / "one_to_two", 2)
  shutil.copytree(one / "grpo", tmp / "heldout_two")
  heldout = tmp / "heldout.jsonl"  # 20 segments: a full 16-row batch and one with filler rows
  heldout.write_text("".join(open(sources.resolve_sources("sample:test")[0]).readlines()[:20]))
  multihost_worker.DECODED.clear()
  with multihost_worker.count_decoded_rows():
    one_heldout = chain.held_out_scores(multihost_worker.heldout_config(str(heldout)), str(one / "grpo"))
  run_processes([{"config": "stages", "workdir": str(two)}, {"config": "sft", "workdir": str(tmp / "one_to_two")},
                 {"heldout": str(tmp / "heldout_two"), "data": str(heldout)}], tmp)
  shutil.copytree(two / "sft", tmp / "two_to_one")
  keep_until(tmp / "two_to_one", 2)
  stage.train(multihost_worker.sft_config(), str(tmp / "two_to_one"))
  return {"dir": tmp, "one_results": one_results, "two_results": json.loads((two / "results.json").read_text()),
          "one_scored": one_scored, "one_heldout": one_heldout, "one_decoded": list(multihost_worker.DECODED),
          "two_heldout": json.loads((tmp / "heldout_two" / "results.json").read_text())}


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_the_same_model(runs, stage):
  tmp = runs["dir"]
  assert max_diff(tmp / "one" / stage, tmp / "two" / stage) <= 1e-6
  one, two = runs["one_results"][stage], runs["two_results"][stage]
  for key in ("loss", "eval/loss", "reward/mean", "frac_reward_zero_std", "completions/mean_length"):
    if key in one:
      np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  rows_one, rows_two = ([r for r in read_jsonl(tmp / run / stage / "metrics.jsonl") if "loss" in r]
                        for run in ("one", "two"))
  assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
  np.testing.assert_allclose([r["loss"] for r in rows_two], [r["loss"] for r in rows_one], rtol=1e-6, atol=1e-6)
  for key in ("data/truncated", "data/truncated_frac", "data/dropped"):  # counted on the global stream
    assert [r.get(key) for r in rows_two] == [r.get(key) for r in rows_one], key
  assert stage != "sft" or any(r["data/truncated"] for r in rows_one)  # 64-token rows cut some sample chats


def test_grpo_rollouts_are_global(runs):
  """Same completions, rewards and group statistics as one process: groups and reward metrics span all hosts."""
  tmp = runs["dir"]
  assert read_jsonl(tmp / "two" / "grpo" / "samples.jsonl") == read_jsonl(tmp / "one" / "grpo" / "samples.jsonl")
  for key in [k for k in runs["one_results"]["grpo"] if k.startswith(("reward", "completions/"))]:
    np.testing.assert_allclose(runs["two_results"]["grpo"][key], runs["one_results"]["grpo"][key], rtol=1e-5)


def test_each_host_scores_only_its_rollout_rows(runs):
  """Every reward call on a host got half of the global rollout (the other half was scored by the other host)."""
  one, two = runs["one_scored"], runs["two_results"]["reward_rows"]
  assert one and all(n == 16 for n in one)  # prompts_per_step x num_generations
  assert two == [[n // 2 for n in one]] * 2


def test_held_out_decoding_is_split_across_hosts(runs):
  """Both hosts make the same sampler calls, each decoding half of every global batch; texts and scores equal one
  process's."""
  tmp, one = runs["dir"], runs["one_decoded"]
  assert one == [16, 16]  # 20 segments in 16-row batches
  assert runs["two_heldout"]["decoded_rows"] == [[n // 2 for n in one]] * 2
  assert runs["two_heldout"]["heldout"] == runs["one_heldout"]
  eval_one, eval_two = tmp / "one" / "grpo" / "eval", tmp / "heldout_two" / "eval"
  assert read_jsonl(eval_two / "hypotheses.jsonl") == read_jsonl(eval_one / "hypotheses.jsonl")
  assert any(r["hypothesis"] for r in read_jsonl(eval_one / "hypotheses.jsonl"))
  assert json.loads((eval_two / "report.json").read_text()) == json.loads((eval_one / "report.json").read_text())


@pytest.mark.parametrize("handover", ["one_to_two", "two_to_one"])
def test_checkpoint_continues_on_another_process_count(runs, handover):
  assert max_diff(runs["dir"] / "one" / "sft", runs["dir"] / handover) <= 1e-6


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
  workdir = tmp_path / "run"
  cmd = ["bash", str(REPO / "launch" / "local_run.sh"), "--config=configs/sft.py:tiny", f"--workdir={workdir}",
         "--processes=2", "--cpu_devices=4", "--", "--config.train.steps=1000", "--config.train.log_every=1",
         "--config.data.seq_len=64", "--config.train.checkpoint_every=0", "--config.data.eval="]
  proc = subprocess.Popen(cmd, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  lines, pids = [], {}
  try:
    deadline = time.time() + TIMEOUT_S
    for line in proc.stdout:
      lines.append(line)
      if m := re.search(r"process (\d) of 2: pid (\d+)", line):
        pids[int(m[1])] = int(m[2])
      if re.search(r"^\[p0\].*step 2/1000", line) and 1 in pids:
        os.kill(pids[1], signal.SIGTERM)
      assert time.time() < deadline, "".join(lines[-50:])
    code = proc.wait(timeout=60)
  finally:
    kill_group(proc)
  log = "".join(lines)
  assert code == 143, log[-5000:]  # every process exits 128 + SIGTERM: launchers retry, the retry resumes
  assert len(re.findall(r"\[p\d\] stopped at step \d+ of 1000 \(SIGTERM\)", log)) == 2, log[-5000:]
  stops = {p: int(s) for p, s in re.findall(r"\[p(\d)\].*stop requested: saving a checkpoint at step (\d+)", log)}
  assert set(stops) == {"0", "1"} and len(set(stops.values())) == 1, log[-5000:]
  saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
  assert saved == [stops["0"]] and saved[0] < 1000


def test_a_peer_that_never_arrives_is_named(tmp_path):
  codes, log = run_processes([], tmp_path, started=1, expect_ok=False, timeout_s=300, TOWERPLUS_INIT_TIMEOUT="5")
  assert codes[0] != 0
  assert re.search(r"process 0 of 2 could not join the coordinator at 127\.0\.0\.1:\d+ within 5 s", log), log


def test_a_dead_process_stops_the_others(tmp_path):
  """Process 1 exits right after start-up; process 0, blocked in a collective, exits non-zero (no hang)."""
  codes, log = run_processes([{"die": 1}], tmp_path, expect_ok=False, timeout_s=300, TOWERPLUS_HEARTBEAT_TIMEOUT="10")
  assert codes[1] == 3 and codes[0] != 0, log
