"""launch/tpu_run.sh and launch/local_run.sh against fake `gcloud` / `python` on PATH; distributed.initialize()."""
from __future__ import annotations

import http.server
import os
import shlex
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import jax
import pytest

from towerplus_jax import distributed

REPO = Path(__file__).resolve().parents[1]
TPU_RUN = REPO / "launch" / "tpu_run.sh"
LOCAL_RUN = REPO / "launch" / "local_run.sh"

# Logs its argv (shell-quoted, one call per line, in one write: the slices' runs call it at once); `describe` plays
# the comma-separated FAKE_TPU_STATES in turn (the last one repeats; NOT_FOUND fails like gcloud); ssh running
# towerplus_jax.main fails FAKE_RUN_FAILS times per node (only on node FAKE_FAIL_NODE when set) and, with
# FAKE_RUN_TOGETHER=N, fails unless N runs have started within 10 s.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
line=$(printf '%q ' "$@"); printf '%s\n' "$line" >>"$FAKE_DIR/calls"
args=" $* "
count() { local n; n=$(cat "$FAKE_DIR/$1" 2>/dev/null || echo 0); echo $((n + 1)) >"$FAKE_DIR/$1"; echo "$n"; }
command=""
for a in "$@"; do [[ $a == --command=* ]] && command=${a#--command=}; done
case $args in
  *" queued-resources describe "*)
    [[ -n ${FAKE_QR_STATE:-} ]] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }
    echo "$FAKE_QR_STATE" ;;
  *" tpu-vm describe "*)
    IFS=, read -ra states <<<"${FAKE_TPU_STATES:-READY}"
    n=$(count describes)
    state=${states[$((n < ${#states[@]} ? n : ${#states[@]} - 1))]}
    [[ $state != NOT_FOUND ]] || { echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND" >&2; exit 1; }
    printf 'acceleratorType: %s\nname: projects/p/locations/z/nodes/n\nruntimeVersion: %s\nstate: %s\n' \
      "${FAKE_ACCEL:-v4-32}" "${FAKE_RUNTIME:-tpu-ubuntu2204-base}" "$state" ;;
  *" tpu-vm scp "*) cp "$5" "$FAKE_DIR/package.tar.gz" ;;
  *" tpu-vm ssh "*)
    if [[ $command == *towerplus_jax.main* ]]; then
      printf '%s' "$command" >"$FAKE_DIR/run_command"
      touch "$FAKE_DIR/started-$5"
      if [[ -n ${FAKE_RUN_TOGETHER:-} ]]; then
        for _ in $(seq 100); do (($(ls "$FAKE_DIR" | grep -c '^started-') >= FAKE_RUN_TOGETHER)) && break; sleep 0.1; done
        (($(ls "$FAKE_DIR" | grep -c '^started-') >= FAKE_RUN_TOGETHER)) || { echo "$5 started alone" >&2; exit 9; }
      fi
      if [[ ${FAKE_FAIL_NODE:-$5} == "$5" ]] && (($(count "runs-$5") < ${FAKE_RUN_FAILS:-0})); then
        echo "worker 1: terminated" >&2; exit "${FAKE_RUN_EXIT:-3}"
      fi
      echo "training done on $5"
    elif [[ $command == *pip* ]]; then
      printf '%s' "$command" >"$FAKE_DIR/install_command"
    fi ;;
esac
exit 0
"""

# The pre-flight's `python3 -m towerplus_jax.aot ...` (on the launching machine): records its argv and folder, prints a
# report, exits FAKE_PREFLIGHT_EXIT (0 fits, 1 does not fit, 2 cannot run).
FAKE_PREFLIGHT_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$FAKE_DIR/preflight_argv"
printf '%s' "$PWD" >"$FAKE_DIR/preflight_cwd"
code=${FAKE_PREFLIGHT_EXIT:-0}
if ((code == 2)); then echo "error: libtpu is not installed: pip install 'jax[tpu]'" >&2; exit 2; fi
echo "memory report: 9.6 GiB of 16.0 GiB per chip"
((code == 0)) || echo "does not fit: lower --config.train.per_device_batch_size"
exit "$code"
"""

BASE_ARGS = ["--name=tower", "--project=proj", "--zone=us-central2-b", "--config=configs/sft.py:tiny",
             "--workdir=gs://bucket/sft", "--retry-wait=0"]


def _write_exe(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


def _kind(argv: list[str]) -> str:
  """A short name for one gcloud call, e.g. `create`, `ssh:run`."""
  group = "qr-" if "queued-resources" in argv else ""
  verb = next(w for w in ("create", "delete", "describe", "scp", "ssh") if w in argv)
  if verb != "ssh":
    return group + verb
  command = next(a for a in argv if a.startswith("--command="))
  return "ssh:" + ("run" if "towerplus_jax.main" in command else "install" if "pip" in command else "other")


def run_tpu(tmp_path: Path, *args: str, **fake_env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
  fake_dir = tmp_path / "fake"
  fake_dir.mkdir(exist_ok=True)
  _write_exe(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
  _write_exe(tmp_path / "bin" / "python3", FAKE_PREFLIGHT_PYTHON)
  env = {k: v for k, v in os.environ.items() if k != "PREFLIGHT_PYTHON"}
  env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_DIR=str(fake_dir), **fake_env)
  proc = subprocess.run(["bash", str(TPU_RUN), *args], env=env, capture_output=True, text=True, timeout=60)
  calls_file = fake_dir / "calls"
  calls = [shlex.split(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
  return proc, calls


def _one(calls: list[list[str]], kind: str) -> list[str]:
  return next(c for c in calls if _kind(c) == kind)


def _preflight_argv(tmp_path: Path) -> list[str] | None:
  path = tmp_path / "fake" / "preflight_argv"
  return path.read_text().splitlines() if path.exists() else None


def test_scripts_parse_and_print_help():
  for script in (TPU_RUN, LOCAL_RUN):
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--config" in out and "--workdir" in out
  assert all(f in subprocess.run(["bash", str(TPU_RUN), "--help"], capture_output=True, text=True).stdout
             for f in ("--accelerator-type", "--runtime-version", "--create", "--spot", "--retries", "--env"))


def test_create_copy_install_run(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", "--spot", "--accelerator-type=v4-32",
                        "--", "--config.train.steps=100", FAKE_TPU_STATES="NOT_FOUND,READY")
  assert proc.returncode == 0, proc.stderr
  assert "training done" in proc.stdout
  assert [_kind(c) for c in calls] == ["describe", "create", "describe", "scp", "ssh:install", "ssh:run"]
  for call in calls:
    assert call[0] == "compute" and "--project=proj" in call and "--zone=us-central2-b" in call
    assert "tower" in call or "tower:towerplus_jax.tar.gz" in call
  create = _one(calls, "create")
  assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
  assert "--worker=all" in _one(calls, "scp") and "--worker=all" in _one(calls, "ssh:install")
  run = " ".join(_one(calls, "ssh:run"))
  for piece in ("--worker=all", "TOWERPLUS_DISTRIBUTED=1", "-m towerplus_jax.main", "--config=configs/sft.py:tiny",
                "--workdir=gs://bucket/sft", "--config.train.steps=100", "tee -a logs/"):
    assert piece in run


@pytest.mark.parametrize("accelerator,runtime", [  # Cloud TPU "TPU software versions" table for JAX
    ("v6e-16", "v2-alpha-tpuv6e"), ("v5p-8", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base")])
def test_default_runtime_per_family(tmp_path, accelerator, runtime):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", f"--accelerator-type={accelerator}",
                        FAKE_TPU_STATES="NOT_FOUND,READY")
  assert proc.returncode == 0, proc.stderr
  assert f"--version={runtime}" in _one(calls, "create")
  assert "--spot" not in _one(calls, "create") and "--preemptible" not in _one(calls, "create")


def test_preempted_run_is_recreated_and_rerun(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", "--preemptible", "--accelerator-type=v5litepod-16",
                        "--retries=2", FAKE_TPU_STATES="NOT_FOUND,READY,PREEMPTED,READY", FAKE_RUN_FAILS="1")
  assert proc.returncode == 0, proc.stderr
  assert [_kind(c) for c in calls] == [
      "describe", "create", "describe", "scp", "ssh:install", "ssh:run",
      "describe", "delete", "create", "describe", "scp", "ssh:install", "ssh:run"]
  creates = [c for c in calls if _kind(c) == "create"]
  assert creates[0] == creates[1] and "--preemptible" in creates[0]
  runs = [c for c in calls if _kind(c) == "ssh:run"]
  assert runs[0] == runs[1]  # the same command: the trainer resumes from the latest checkpoint


def test_recreate_takes_the_spec_of_the_preempted_node(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--retries=1", FAKE_TPU_STATES="READY,PREEMPTED,READY",
                        FAKE_RUN_FAILS="1", FAKE_ACCEL="v6e-8", FAKE_RUNTIME="v2-alpha-tpuv6e")
  assert proc.returncode == 0, proc.stderr
  assert [_kind(c) for c in calls] == ["describe", "scp", "ssh:install", "ssh:run",
                                       "describe", "delete", "create", "describe", "scp", "ssh:install", "ssh:run"]
  assert {"--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e"} <= set(_one(calls, "create"))


def test_failure_on_a_ready_tpu_reruns_then_propagates_exit_status_and_deletes(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--retries=1", "--delete-after", FAKE_RUN_FAILS="5", FAKE_RUN_EXIT="7")
  assert proc.returncode == 7
  assert [_kind(c) for c in calls] == ["describe", "scp", "ssh:install", "ssh:run",
                                       "describe", "ssh:other", "ssh:run", "delete"]
  cleanup = next(a for a in calls[5] if a.startswith("--command="))
  assert "pkill" in cleanup and "towerplus_jax.main" not in cleanup  # must not match its own command line


def test_queued_resource_spot(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", "--queued", "--spot", "--accelerator-type=v5litepod-16",
                        "--delete-after", FAKE_TPU_STATES="NOT_FOUND,NOT_FOUND,READY")
  assert proc.returncode == 0, proc.stderr
  assert [_kind(c) for c in calls] == ["describe", "qr-describe", "qr-create", "describe", "qr-describe",
                                       "describe", "scp", "ssh:install", "ssh:run", "qr-delete"]
  assert {"--node-id=tower", "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
          "--spot"} <= set(_one(calls, "qr-create"))
  assert "--force" in _one(calls, "qr-delete")


def test_missing_tpu_without_create_fails(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, FAKE_TPU_STATES="NOT_FOUND")
  assert proc.returncode == 2 and "--create" in proc.stderr
  assert [_kind(c) for c in calls] == ["describe"]


@pytest.mark.parametrize("extra,message", [
    (["--bogus=1"], "--bogus"), (["--env=1X=2"], "--env=1X=2"), (["--retries=many"], "--retries"),
    (["--config=configs/nope.py:tiny"], "configs/nope.py"), (["--create", "--accelerator-type=tpu9-8"], "tpu9-8"),
    (["--spot", "--preemptible"], "--preemptible"), (["stray"], "stray")])
def test_bad_arguments_fail_before_any_gcloud_call(tmp_path, extra, message):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, *extra)
  assert proc.returncode == 2 and message in proc.stderr
  assert calls == []


def test_run_command_executes_main_with_args_env_and_log(tmp_path):
  tricky = "--config.data.train=a b's \"x\".jsonl"
  proc, _ = run_tpu(tmp_path, *BASE_ARGS, "--env=GREETING=it's $HOME", "--", "--config.train.steps=3", tricky)
  assert proc.returncode == 0, proc.stderr
  command = (tmp_path / "fake" / "run_command").read_text()
  home = tmp_path / "home"
  _write_exe(home / "towerplus_jax" / ".venv" / "bin" / "python",
             '#!/usr/bin/env bash\nprintf "%s\\n" "$@" >"$HOME/argv"\n'
             'printf "%s|%s|%s" "$TOWERPLUS_DISTRIBUTED" "$GREETING" "$PWD" >"$HOME/env"\n'
             'echo "step 1"; exit "${FAKE_EXIT:-0}"\n')
  env = {"PATH": os.environ["PATH"], "HOME": str(home)}
  # The worker's login shell runs the --command string from the home folder.
  subprocess.run(["bash", "-c", command], cwd=home, env=env, check=True, capture_output=True)
  assert (home / "argv").read_text().splitlines() == [
      "-m", "towerplus_jax.main", "--config=configs/sft.py:tiny", "--workdir=gs://bucket/sft",
      "--config.train.steps=3", tricky]
  assert (home / "env").read_text() == f"1|it's $HOME|{home / 'towerplus_jax'}"
  logs = list((home / "towerplus_jax" / "logs").glob("*.log"))
  assert len(logs) == 1 and "step 1" in logs[0].read_text()
  failed = subprocess.run(["bash", "-c", command], cwd=home, env={**env, "FAKE_EXIT": "5"}, capture_output=True)
  assert failed.returncode == 5  # through the tee


# ---------------------------------------------------------------------------------------------- pre-flight check

def test_help_documents_preflight_and_multislice_flags():
  out = subprocess.run(["bash", str(TPU_RUN), "--help"], capture_output=True, text=True, check=True).stdout
  for flag in ("--skip-preflight", "--hbm-gib", "--num-slices", "PREFLIGHT_PYTHON"):
    assert flag in out


def test_preflight_passes_with_the_config_flags_then_launches(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", "--accelerator-type=v5litepod-16", "--hbm-gib=15.5",
                        "--", "--config.train.steps=100", "--seed=3", "--config.data.train=a b.jsonl",
                        FAKE_TPU_STATES="NOT_FOUND,READY")
  assert proc.returncode == 0, proc.stderr
  assert _preflight_argv(tmp_path) == [
      "-m", "towerplus_jax.aot", "--config=configs/sft.py:tiny", "--topology=v5litepod-16", "--hbm_gib=15.5",
      "--config.train.steps=100", "--config.data.train=a b.jsonl"]
  assert (tmp_path / "fake" / "preflight_cwd").read_text() == str(REPO)
  assert "memory report" in proc.stdout  # streamed to the user
  assert [_kind(c) for c in calls] == ["describe", "create", "describe", "scp", "ssh:install", "ssh:run"]
  assert "--seed=3" in " ".join(_one(calls, "ssh:run"))


def test_preflight_python_from_the_environment(tmp_path):
  _write_exe(tmp_path / "bin" / "mypy3", '#!/usr/bin/env bash\necho "$0 $*" >"$FAKE_DIR/mypy3"\n')
  proc, _ = run_tpu(tmp_path, *BASE_ARGS, PREFLIGHT_PYTHON=f"{tmp_path / 'bin' / 'mypy3'} -X utf8")
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "fake" / "mypy3").read_text().startswith(f"{tmp_path / 'bin' / 'mypy3'} -X utf8 -m towerplus_jax.aot")
  assert _preflight_argv(tmp_path) is None


@pytest.mark.parametrize("states", ["NOT_FOUND", "READY"])
def test_preflight_does_not_fit_stops_before_touching_the_tpu(tmp_path, states):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", "--accelerator-type=v4-8", "--delete-after",
                        FAKE_TPU_STATES=states, FAKE_PREFLIGHT_EXIT="1")
  assert proc.returncode == 1
  assert "does not fit: lower" in proc.stdout
  assert ("tpu_run.sh: error: pre-flight: configs/sft.py:tiny does not fit v4-8 (see the report above; "
          "--skip-preflight to launch anyway)") in proc.stderr.splitlines()
  assert [_kind(c) for c in calls] == ["describe"]  # no create / scp / ssh, and --delete-after deletes nothing


def test_preflight_that_cannot_run_exits_2(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--accelerator-type=v4-8", FAKE_PREFLIGHT_EXIT="2")
  assert proc.returncode == 2
  assert "error: libtpu is not installed: pip install 'jax[tpu]'" in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert "pre-flight could not run" in last and "--skip-preflight" in last
  assert [_kind(c) for c in calls] == ["describe"]


def test_preflight_python_missing_exits_2(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, PREFLIGHT_PYTHON=str(tmp_path / "no-such-python"))
  assert proc.returncode == 2 and "pre-flight could not run" in proc.stderr
  assert [_kind(c) for c in calls] == ["describe"]


@pytest.mark.parametrize("flag", ["--skip-preflight", "--skip_preflight"])
def test_skip_preflight(tmp_path, flag):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, flag, FAKE_PREFLIGHT_EXIT="1")
  assert proc.returncode == 0, proc.stderr
  assert _preflight_argv(tmp_path) is None
  assert [_kind(c) for c in calls] == ["describe", "scp", "ssh:install", "ssh:run"]


def test_preflight_reads_the_accelerator_type_of_the_existing_node(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, FAKE_ACCEL="v6e-8")
  assert proc.returncode == 0, proc.stderr
  assert "--topology=v6e-8" in _preflight_argv(tmp_path)
  assert [_kind(c) for c in calls] == ["describe", "scp", "ssh:install", "ssh:run"]


def test_preflight_without_a_node_or_accelerator_type_fails(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", FAKE_TPU_STATES="NOT_FOUND")
  assert proc.returncode == 2
  errors = [line for line in proc.stderr.splitlines() if "error" in line]
  assert len(errors) == 1 and errors[0].startswith("tpu_run.sh: error: pre-flight:")
  assert "--accelerator-type" in proc.stderr and "--skip-preflight" in proc.stderr
  assert _preflight_argv(tmp_path) is None and [_kind(c) for c in calls] == ["describe"]


# ------------------------------------------------------------------------------------------------------ multislice

def _node(call: list[str]) -> str:
  """The node of a tpu-vm call: compute tpus tpu-vm VERB NODE ... / compute tpus tpu-vm scp LOCAL NODE:PATH."""
  return call[5].split(":")[0] if call[3] == "scp" else call[4]


def test_multislice_creates_one_queued_resource_and_runs_every_slice_at_once(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--create", "--queued", "--spot", "--num-slices=2",
                        "--accelerator-type=v5litepod-16", "--delete-after", "--", "--config.train.steps=5",
                        FAKE_TPU_STATES="NOT_FOUND,NOT_FOUND,READY", FAKE_RUN_TOGETHER="2")
  assert proc.returncode == 0, proc.stderr
  assert "training done on tower-0" in proc.stdout and "training done on tower-1" in proc.stdout
  assert [_kind(c) for c in calls] == ["describe", "describe", "qr-describe", "qr-create", "describe", "describe",
                                       "scp", "scp", "ssh:install", "ssh:install", "ssh:run", "ssh:run", "qr-delete"]
  assert [_node(c) for c in calls if _kind(c) in ("describe", "scp", "ssh:install")] == ["tower-0", "tower-1"] * 4
  assert {_node(c) for c in calls if _kind(c) == "ssh:run"} == {"tower-0", "tower-1"}
  assert all("--worker=all" in c for c in calls if _kind(c) in ("scp", "ssh:install", "ssh:run"))
  create = _one(calls, "qr-create")
  assert create[4] == "tower"
  assert {"--node-count=2", "--node-prefix=tower", "--accelerator-type=v5litepod-16",
          "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
  assert not any(a.startswith("--node-id") for a in create)
  assert _one(calls, "qr-delete")[4] == "tower"
  run = " ".join(_one(calls, "ssh:run"))
  assert "--config.mesh.slices=2" in run and "--config.train.steps=5" in run
  assert _preflight_argv(tmp_path) == ["-m", "towerplus_jax.aot", "--config=configs/sft.py:tiny",
                                       "--topology=v5litepod-16", "--num_slices=2", "--config.train.steps=5"]


def test_multislice_exit_status_is_the_failed_slices(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--num-slices=2", FAKE_FAIL_NODE="tower-1", FAKE_RUN_FAILS="1",
                        FAKE_RUN_EXIT="7")
  assert proc.returncode == 7
  assert [_kind(c) for c in calls].count("ssh:run") == 2 and "training done on tower-0" in proc.stdout


def test_multislice_preempted_slice_recreates_the_queued_resource(tmp_path):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, "--queued", "--spot", "--num-slices=2", "--retries=1",
                        FAKE_TPU_STATES="READY,READY,PREEMPTED,READY", FAKE_FAIL_NODE="tower-1", FAKE_RUN_FAILS="1",
                        FAKE_ACCEL="v4-8")
  assert proc.returncode == 0, proc.stderr
  setup = ["scp", "scp", "ssh:install", "ssh:install", "ssh:run", "ssh:run"]
  assert [_kind(c) for c in calls] == ["describe", "describe", *setup, "describe", "describe", "qr-delete",
                                       "qr-describe", "qr-create", "describe", "describe", *setup]
  assert {"--node-count=2", "--node-prefix=tower", "--accelerator-type=v4-8",
          "--runtime-version=tpu-ubuntu2204-base"} <= set(_one(calls, "qr-create"))
  assert "--topology=v4-8" in _preflight_argv(tmp_path) and "--num_slices=2" in _preflight_argv(tmp_path)


@pytest.mark.parametrize("extra,message", [
    (["--create", "--num-slices=2", "--accelerator-type=v4-8"], "--queued"),
    (["--num-slices=0"], "--num-slices=0"), (["--num-slices=two"], "--num-slices=two"),
    (["--num-slices=1.5"], "--num-slices=1.5"), (["--num-slices=-2"], "--num-slices=-2"),
    (["--hbm-gib=0"], "--hbm-gib=0"), (["--hbm-gib=0.0"], "--hbm-gib=0.0"), (["--hbm-gib=-4"], "--hbm-gib=-4"),
    (["--hbm-gib=lots"], "--hbm-gib=lots"), (["--hbm-gib="], "--hbm-gib=")])
def test_bad_slice_and_preflight_values_fail_in_one_line(tmp_path, extra, message):
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, *extra)
  assert proc.returncode == 2 and message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert calls == [] and _preflight_argv(tmp_path) is None


def _make_repo(root: Path) -> None:
  for rel in ("configs/sft.py", "towerplus_jax/__init__.py", "workdirs/run/ckpt", "towerplus_jax/__pycache__/a.pyc",
              ".git/HEAD"):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("x")


@pytest.mark.parametrize("use_git", [False, True])
def test_package_and_install_command(tmp_path, use_git):
  repo = tmp_path / "repo"
  _make_repo(repo)
  if use_git:
    shutil.rmtree(repo / ".git")
    (repo / ".gitignore").write_text("workdirs/\n__pycache__/\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
  proc, calls = run_tpu(tmp_path, *BASE_ARGS, f"--repo-dir={repo}", "--pip-extras=hf,tfds", "--python-version=3.12")
  assert proc.returncode == 0, proc.stderr
  with tarfile.open(tmp_path / "fake" / "package.tar.gz") as tar:
    names = {n.removeprefix("./") for n in tar.getnames()}
  assert {"configs/sft.py", "towerplus_jax/__init__.py"} <= names
  assert not any(n.startswith((".git/", "workdirs")) or "__pycache__" in n for n in names)
  # Run the install command as a worker would, with the package where scp put it and a fake python3.
  home = tmp_path / "home"
  home.mkdir()
  shutil.copy(tmp_path / "fake" / "package.tar.gz", home / "towerplus_jax.tar.gz")
  _write_exe(tmp_path / "wbin" / "python3", '#!/usr/bin/env bash\necho "$*" >>"$HOME/python3_calls"\n')
  env = {"PATH": f"{tmp_path / 'wbin'}:{os.environ['PATH']}", "HOME": str(home)}
  subprocess.run(["bash", "-c", (tmp_path / "fake" / "install_command").read_text()], cwd=home, env=env, check=True)
  assert (home / "towerplus_jax" / "configs" / "sft.py").exists()
  python_calls = (home / "python3_calls").read_text().splitlines()
  assert any("uv venv" in c and "--python 3.12 .venv" in c for c in python_calls)
  assert any("uv pip install" in c and "-e .[hf,tfds,tpu]" in c for c in python_calls)


# ---------------------------------------------------------------------------------------------------- local_run.sh

FAKE_PYTHON = """#!/usr/bin/env bash
printf "%s\\n" "$@" >"$FAKE_DIR/argv"
printf "%s\\n%s\\n%s\\n%s" "$PWD" "${XLA_FLAGS:-}" "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" "${FOO:-}" >"$FAKE_DIR/env"
"""


def run_local(tmp_path: Path, *args: str, gpu: bool, xla_flags: str = "") -> tuple[list[str], list[str]]:
  fake_dir = tmp_path / "fake"
  fake_dir.mkdir(exist_ok=True)
  _write_exe(tmp_path / "bin" / "python", FAKE_PYTHON)
  _write_exe(tmp_path / "bin" / "nvidia-smi", "#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\n"
             if gpu else "#!/usr/bin/env bash\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTHON"))}
  env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", FAKE_DIR=str(fake_dir))
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  subprocess.run(["bash", str(LOCAL_RUN), *args], cwd=tmp_path, env=env, check=True, timeout=30)
  return (fake_dir / "argv").read_text().splitlines(), (fake_dir / "env").read_text().split("\n")


def test_local_run_cpu(tmp_path):
  argv, env = run_local(tmp_path, "--config=configs/sft.py:tiny", "--workdir=runs/a", "--env=FOO=bar",
                        "--", "--config.train.steps=2", gpu=False)
  assert argv == ["-m", "towerplus_jax.main", "--config=configs/sft.py:tiny", f"--workdir={tmp_path}/runs/a",
                  "--config.train.steps=2"]
  assert env == [str(REPO), "", "", "bar"]  # run from the repo root; no GPU flags on CPU


def test_local_run_gpu_flags_keep_user_settings_and_are_known_to_xla(tmp_path):
  user = "--xla_gpu_enable_latency_hiding_scheduler=false"
  argv, env = run_local(tmp_path, "--config", "configs/sft.py:tiny", "--workdir", "gs://b/r", gpu=True,
                        xla_flags=user)
  assert argv[-1] == "--workdir=gs://b/r"
  flags = env[1].split()
  assert flags[0] == user and len([f for f in flags if "latency_hiding" in f]) == 1
  assert "--xla_gpu_enable_highest_priority_async_stream=true" in flags and env[2] == "0.9"
  # An unknown flag in XLA_FLAGS aborts XLA at start-up: check the installed jaxlib knows every one.
  check = subprocess.run(["python", "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                         env={**os.environ, "XLA_FLAGS": env[1], "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=60)
  assert check.returncode == 0, check.stderr[-500:]


def test_local_run_config_relative_to_the_caller(tmp_path):
  (tmp_path / "my.py").write_text("")
  argv, _ = run_local(tmp_path, "--config=my.py:small", "--workdir=/abs/w", gpu=False)
  assert argv[2:4] == [f"--config={tmp_path}/my.py:small", "--workdir=/abs/w"]


FAKE_PROCESS_PYTHON = """#!/usr/bin/env bash
if [[ $1 == -c ]]; then echo 45678; exit 0; fi
echo "id=$JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS gpus=${CUDA_VISIBLE_DEVICES:-} $XLA_FLAGS"
exit $((JAX_PROCESS_ID * 3))
"""


@pytest.mark.parametrize("gpu", [False, True])
def test_local_run_processes(tmp_path, gpu):
  _write_exe(tmp_path / "bin" / "python", FAKE_PROCESS_PYTHON)
  _write_exe(tmp_path / "bin" / "nvidia-smi", "#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo \"GPU $i: H100\"; done\n"
             if gpu else "#!/usr/bin/env bash\nexit 9\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "PYTHON", "JAX_", "CUDA_"))}
  env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  out = subprocess.run(["bash", str(LOCAL_RUN), "--config=configs/sft.py:tiny", "--workdir=w", "--processes=2",
                        "--cpu_devices=4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
  assert out.returncode == 3  # the worst exit code
  lines = sorted(line for line in out.stdout.splitlines() if line.startswith("[p"))
  devices = ("gpus=0,1 ", "gpus=2,3 ") if gpu else ("gpus= --xla_force_host_platform_device_count=4",) * 2
  for i, line in enumerate(lines):
    assert line.startswith(f"[p{i}] id={i} of 2 at 127.0.0.1:45678 {devices[i]}"), out.stdout
  assert len(lines) == 2 and "process 1 of 2: pid" in out.stderr


# ------------------------------------------------------------------------------------------ towerplus_jax.distributed

_CLUSTER_ENV = ("TOWERPLUS_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                "MEGASCALE_NUM_SLICES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
                "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID", "GCE_METADATA_IP", "TOWERPLUS_INIT_TIMEOUT", "TOWERPLUS_HEARTBEAT_TIMEOUT")


@pytest.fixture
def clean_env(monkeypatch):
  for key in _CLUSTER_ENV:
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  distributed.initialize.cache_clear()
  yield monkeypatch
  distributed.initialize.cache_clear()


@pytest.mark.parametrize("env,multi", [
    ({}, False), ({"TOWERPLUS_DISTRIBUTED": "1"}, True), ({"TOWERPLUS_DISTRIBUTED": "0",
                                                            "TPU_WORKER_HOSTNAMES": "a,b"}, False),
    ({"TPU_WORKER_HOSTNAMES": "a"}, False), ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True), ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False), ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True)])
def test_multi_host_reason(clean_env, env, multi):
  assert (distributed.multi_host_reason(env) is not None) == multi


def test_bad_env_values_name_the_variable(clean_env):
  with pytest.raises(ValueError, match="TOWERPLUS_DISTRIBUTED"):
    distributed.multi_host_reason({"TOWERPLUS_DISTRIBUTED": "maybe"})
  with pytest.raises(ValueError, match="SLURM_NTASKS"):
    distributed.multi_host_reason({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "four"})


@pytest.mark.parametrize("endpoints,multi", [("w0", False), ("10.0.0.1:0:w0,10.0.0.2:1:w1", True)])
def test_cloud_tpu_vm_asks_the_metadata_server(clean_env, endpoints, multi):
  seen = []

  class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      seen.append((self.path, self.headers.get("Metadata-Flavor")))
      body = endpoints.encode()
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    clean_env.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    reason = distributed.multi_host_reason({"GCE_METADATA_IP": f"127.0.0.1:{server.server_port}"})
  finally:
    server.shutdown()
  assert (reason is not None) == multi
  assert seen == [("/computeMetadata/v1/instance/attributes/worker-network-endpoints", "Google")]


def test_initialize_single_host_does_not_join(clean_env):
  calls = []
  clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  distributed.initialize()
  assert calls == []


def test_initialize_multi_host_joins_once(clean_env):
  calls = []
  clean_env.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  clean_env.setenv("TOWERPLUS_DISTRIBUTED", "1")
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  clean_env.setenv("JAX_PROCESS_ID", "1")
  clean_env.setenv("TOWERPLUS_HEARTBEAT_TIMEOUT", "7")
  distributed.initialize()
  distributed.initialize()
  assert calls == [{"num_processes": 2, "process_id": 1, "initialization_timeout": distributed.INIT_TIMEOUT_S + 30,
                    "heartbeat_timeout_seconds": 7}]
