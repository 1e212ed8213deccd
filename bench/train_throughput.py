"""Training throughput: our jitted train step (AdamW, lm loss) vs Hugging Face transformers + torch on one batch.

  python -m bench.train_throughput [--family=gemma2] [--batch=8] [--seq=256] [--steps=10] [--dtype=float32]

Same architecture and weights, same random token batch, same optimizer (AdamW, global-norm clipping 1.0). The HF step
runs in a worker process of its own (bench/hf_worker.py), with glibc's default malloc unless `--hf_malloc=ours`.
Warm-up steps (compilation) are excluded; the two take turns step by step and the median step time of `--steps`
steps is reported. MFU = tokens/s × models.config.flops_per_token / the measured peak matmul FLOP/s of this machine.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from bench import common
from towerplus_jax.models.config import ModelConfig, flops_per_token
from towerplus_jax.models.transformer import Transformer

OPTIMIZER = dict(lr=1e-4, schedule="constant", warmup_steps=0, warmup_ratio=0.0, end_lr_ratio=1.0,
                 weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0)


def token_batch(cfg: ModelConfig, batch: int, seq: int) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
          "positions": positions, "segment_ids": np.ones((batch, seq), np.int32)}  # one unpacked example per row


def ours_step(model: Transformer, batch: dict[str, np.ndarray], total_steps: int, logprob_chunk: int,
              lib: str = "towerplus_jax") -> Callable[[], None]:
  """One blocking call = one jitted train step (`training.step.jit_train_step`, donated state) of package `lib`."""
  sharding, optim, losses, state_lib, step_lib = (importlib.import_module(f"{lib}.{m}") for m in (
      "sharding", "training.optim", "losses", "training.state", "training.step"))
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  tx, lr = optim.make(ml_collections.ConfigDict(OPTIMIZER), total_steps)
  loss_cfg = losses.default_config("lm")
  loss_cfg.logprob_chunk = logprob_chunk
  graphdef, state = state_lib.init(model, tx, mesh, seed=0)
  step = step_lib.jit_train_step(graphdef, step_lib.StepOptions(losses.get("lm"), loss_cfg, tx, lr),
                                 jax.tree.map(lambda x: x.sharding, state))
  with jax.set_mesh(mesh):
    device_batch = sharding.shard_local_batch(batch, mesh)

  def one() -> None:
    nonlocal state
    with jax.set_mesh(mesh):
      state, metrics = step(state, device_batch)
    metrics["loss"].block_until_ready()
  return one


def hf_step(model, dtype: str, batch: dict[str, np.ndarray]) -> Callable[[], None]:
  """One blocking call = forward, cross entropy, backward, clipping, torch.optim.AdamW step."""
  torch, device = common.torch_setup()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=OPTIMIZER["lr"], betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
                          eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"])
  inputs = torch.as_tensor(batch["inputs"], dtype=torch.long, device=device)
  targets = torch.as_tensor(batch["targets"], dtype=torch.long, device=device)

  def one() -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits_BTV = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits_BTV.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER["clip_norm"])
    opt.step()
    if device.type == "cuda":
      torch.cuda.synchronize()
  return one


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
  parser.add_argument("--peak_size", type=int, default=0, help="matmul size for the peak (0: 2048 CPU, 8192 GPU)")
  parser.add_argument("--skip_hf", action="store_true", help="time our step only")
  common.add_hf_malloc_flag(parser)
  parser.add_argument("--logprob_chunk", type=int, default=0,
                      help="loss.logprob_chunk: 0 = full logits (tiny presets' default), 512 = real presets'")
  args = parser.parse_args(argv)
  cfg = common.model_config(args)
  batch = token_batch(cfg, args.batch, args.seq)
  flops = flops_per_token(cfg, args.seq)
  torch_device = common.torch_setup()[1]
  print(common.device_line(torch_device))
  print(common.model_line(cfg) + f"; batch {args.batch} x seq {args.seq}; {flops / 1e6:.1f} MFLOP/token")
  peak = common.print_peaks(cfg.dtype, args.peak_size or None)
  model = common.our_model(cfg)
  steps = {}
  with contextlib.ExitStack() as stack:
    if not args.skip_hf:  # exported before our step donates (frees) the initial weights
      steps["hf"] = stack.enter_context(common.hf_worker(model, "train", batch, cfg.dtype, args.hf_malloc))[0]
    steps["ours"] = ours_step(model, batch, args.steps + args.warmup, args.logprob_chunk)
    seconds = common.median_seconds(steps, args.steps, args.warmup)
  for name, s in seconds.items():
    tps = args.batch * args.seq / s
    print(f"{name:>4}: {s * 1e3:8.1f} ms/step  {tps:10.0f} tokens/s  MFU {100 * tps * flops / peak:5.1f}% "
          f"(of the {cfg.dtype} matmul peak)")
  if "hf" in seconds:
    print(f"ratio ours/hf: {seconds['hf'] / seconds['ours']:.2f}x tokens/s")


if __name__ == "__main__":
  main()
