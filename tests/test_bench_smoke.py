"""The benchmark scripts run end to end on the smallest model and print their ratio or figure (no timing assertion)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--embed_dim=32", "--layers=2", "--heads=2", "--kv_heads=1", "--head_dim=16", "--mlp_dim=64", "--vocab=256",
        "--steps=2", "--warmup=1"]
RATIO = re.compile(r"^ratio ours/hf( \w+)?: \d+\.\d+x tokens/s$", re.M)


def run_bench(module: str, *flags: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as run by hand: one CPU device
  out = subprocess.run([sys.executable, "-m", module, *TINY, *flags], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)  # generous: a busy 2-core CI machine
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_throughput_prints_ratio_and_mfu():
  stdout = run_bench("bench.train_throughput", "--family=qwen2", "--batch=2", "--seq=16", "--peak_size=256")
  assert len(RATIO.findall(stdout)) == 1, stdout
  assert stdout.count("MFU") == 2, stdout


def test_compare_refs_times_a_git_ref_against_the_working_tree():
  stdout = run_bench("bench.compare_refs", "--ref=HEAD", "--family=gemma2", "--batch=2", "--seq=16")
  assert re.search(r"^ towerplus_jax_ref: +\d+\.\d ms/step \(median\)$", stdout, re.M), stdout
  assert re.search(r"^speed-up working tree / HEAD: \d+\.\d{3}x \(medians\)$", stdout, re.M), stdout


def test_sampler_throughput_prints_greedy_and_sampled_ratios():
  stdout = run_bench("bench.sampler_throughput", "--family=gemma2", "--batch=2", "--prompt=8", "--new=4")
  assert [m.strip() for m in RATIO.findall(stdout)] == ["greedy", "sampled"], stdout
  assert re.search(r"greedy agreement: \d/2 rows identical to HF", stdout), stdout


def test_comet_throughput_prints_ours():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "bench.comet_throughput", "--n=8", "--batch=8", "--steps=1"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^ours +\d+\.\d triples/s  \(8 triples, batch 8, float32\)$", out.stdout, re.M), out.stdout
