"""Shared benchmark pieces: one model architecture for both frameworks, timing, thread set-up and peak FLOP/s.

Both sides get the same random weights: our model is exported with `convert.hf.save_hf` and loaded by
`transformers.AutoModelForCausalLM` (eager PyTorch, float32 master weights).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from towerplus_jax import host_memory, sharding
from towerplus_jax.convert import hf
from towerplus_jax.models.config import FAMILIES, ModelConfig
from towerplus_jax.models.transformer import Transformer


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


def add_model_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--family", choices=FAMILIES, default="gemma2")
  parser.add_argument("--embed_dim", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--mlp_dim", type=int, default=1024)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="activation/compute dtype (master weights stay float32 on both sides)")
  parser.add_argument("--scan_layers", action="store_true", help="our layers as one lax.scan over stacked groups")


def model_config(args: argparse.Namespace, config_cls: type = ModelConfig) -> ModelConfig:
  """The family's preset conventions (softcaps, norms, layer pattern, rope) at the requested size (`config_cls`:
  another copy of the package's ModelConfig, as bench/compare_refs.py uses)."""
  kw = dict(vocab_size=args.vocab, embed_dim=args.embed_dim, mlp_dim=args.mlp_dim, num_layers=args.layers,
            num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype,
            scan_layers=args.scan_layers)
  if args.family.startswith("gemma"):
    kw["query_pre_attn_scalar"] = args.head_dim
  return getattr(config_cls, f"_{args.family}")(**kw)


def our_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Random weights on one device."""
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  return sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)


def save_hf_twin(model: Transformer, directory: str) -> None:
  """Our weights as a Hugging Face folder (our converter, float32, no eos token)."""
  hf.save_hf(model, model.cfg, directory, dtype="float32", generation_config={"pad_token_id": 0})


def load_hf(directory: str, torch_device):
  """The Hugging Face model of `save_hf_twin`'s folder, float32, on `torch_device`."""
  import transformers
  transformers.utils.logging.disable_progress_bar()
  return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype="float32").to(torch_device)


@contextlib.contextmanager
def hf_worker(model: Transformer, kind: str, inputs: dict[str, np.ndarray], arg: str,
              malloc: str = "glibc") -> Iterator[tuple[Callable[[], None], str]]:
  """(one blocking HF call, DIR): `python -m bench.hf_worker KIND DIR ARG` on our weights and `inputs` saved in the
  temporary folder DIR, in a process with glibc's default malloc (as transformers users have it) or with ours."""
  env = dict(os.environ)
  if malloc == "glibc":
    env[host_memory.ENV] = "0"
  with tempfile.TemporaryDirectory() as tmp:
    save_hf_twin(model, tmp)
    np.savez(f"{tmp}/inputs.npz", **inputs)
    with worker_step("bench.hf_worker", [kind, tmp, arg], env) as one:
      yield one, tmp


def add_hf_malloc_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--hf_malloc", choices=("glibc", "ours"), default="glibc",
                      help="HF's process (its own): glibc's default malloc, as transformers users have it, or "
                           "towerplus_jax's host_memory setting")


@contextlib.contextmanager
def worker_step(module: str, args: list[str], env: dict[str, str]) -> Iterator[Callable[[], None]]:
  """A blocking step run by a worker process (`python -m module *args`, which prints `ready`, then `done` for each
  `step` line it reads); the worker is killed on exit."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=root, env=env, text=True, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE)

  def expect(word: str) -> None:
    for line in proc.stdout:
      if line.strip() == word:
        return
      print(line, end="", file=sys.stderr)  # a library's own output
    raise RuntimeError(f"{module} exited with {proc.wait()} before printing {word!r} (its error is above)")

  def one() -> None:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    expect("done")
  try:
    expect("ready")
    yield one
  finally:
    proc.kill()
    proc.wait()


def torch_setup():
  """torch on all cores of this process (or the GPU); returns (torch, device)."""
  import torch
  torch.set_num_threads(num_cores())
  return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def median_seconds(fns: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, float]:
  """Median wall time of each blocking `fn` over `steps` calls after `warmup` untimed ones. The contenders take
  turns call by call, so a change in machine load hits them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def peak_matmul_flops(dtype: str, n: int | None = None, reps: int = 5) -> float:
  """Best measured FLOP/s of one big square jnp matmul on the default device (2n³ FLOPs per product)."""
  n = n or (8192 if jax.default_backend() == "gpu" else 2048)
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def print_peaks(dtype: str, n: int | None = None) -> float:
  """Measure and print the matmul peaks (float32; bfloat16 too on GPU or when asked); returns `dtype`'s."""
  peaks = {"float32": peak_matmul_flops("float32", n)}
  if jax.default_backend() == "gpu" or dtype == "bfloat16":
    peaks["bfloat16"] = peak_matmul_flops("bfloat16", n)
  print("peak matmul (jnp): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
  return peaks[dtype]


def model_line(cfg: ModelConfig) -> str:
  return (f"model {cfg.family}: d={cfg.embed_dim} layers={cfg.num_layers} heads={cfg.num_heads}/{cfg.num_kv_heads} "
          f"head_dim={cfg.head_dim} mlp={cfg.mlp_dim} vocab={cfg.vocab_size} dtype={cfg.dtype} "
          f"scan_layers={cfg.scan_layers}")


def device_line(torch_device) -> str:
  return (f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); torch on "
          f"{torch_device}; {num_cores()} CPU cores")
