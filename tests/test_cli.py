"""`towerplus SUBCOMMAND`: every program behind one command, each answering bad input with one `error:` line and exit
status 2, as its `python -m` form does."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def towerplus(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "towerplus_jax.cli", *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_the_console_script_is_installed():
  (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "towerplus"]
  assert script.value == "towerplus_jax.cli:main"


def test_help_lists_every_subcommand_and_a_misspelt_one_gets_a_suggestion():
  out = towerplus("--help")
  assert out.returncode == 0 and all(f"  {name}" in out.stdout for name in
                                     ("train", "aot", "export", "import", "eval", "reference")), out.stdout
  out = towerplus("trian")
  assert out.returncode == 2 and out.stderr.startswith("error: no subcommand 'trian'; did you mean 'train'?")


@pytest.mark.parametrize("args,message", [
    (["train", "--config=configs/nope.py:tiny", "--workdir={t}/w"], "error: --config=configs/nope.py:tiny: no config"),
    (["train", "--config=configs/sft.py:tiny", "--workdir={t}/w", "--config.optimizer.lrate=0.1"],
     "error: --config.optimizer.lrate: no such key in configs/sft.py:tiny; did you mean --config.optimizer.lr"),
    (["export", "--workdir={t}/none", "--out={t}/hf"], "error: "),
    (["eval", "--workdir={t}/none"], "error: --data is required"),
    (["reference", "--config=configs/wpo.py:tiny", "--workdir={t}/r", "--out={t}/r.jsonl",
      "--config.data.train={t}/none.jsonl"], "error: "),
    (["aot", "--config=configs/sft.py:tiny", "--topology=v9z-8"], "error: "),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, message):
  out = towerplus(*[a.format(t=tmp_path) for a in args])
  lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), out.stderr[-2000:]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "w").exists() and not (tmp_path / "hf").exists()
