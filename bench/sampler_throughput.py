"""Generation throughput: our KV-cache sampler (`rl.sampler.sample`) vs Hugging Face `model.generate`.

  python -m bench.sampler_throughput [--family=gemma2] [--batch=8] [--prompt=64] [--new=64] [--steps=3]

Same architecture and weights, same prompts (all rows `--prompt` tokens), `--new` new tokens per row (no stop
token, so every row runs to the end), greedy and sampled (temperature, top-k, top-p); HF uses its KV cache
(use_cache=True) in a worker process of its own (bench/hf_worker.py), with glibc's default malloc unless
`--hf_malloc=ours`. Warm-up calls (compilation) are excluded; the two take turns call by call and the median of
`--steps` calls per side is reported as new tokens/s. Ours returns no log-probs here (HF computes none); a greedy
agreement line checks both decode alike.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import jax
import numpy as np

from bench import common
from towerplus_jax.evaluate import sampler
from towerplus_jax.models.transformer import Transformer


def ours_generate(model: Transformer, prompts_BP: np.ndarray, new: int, greedy: bool,
                  args: argparse.Namespace) -> Callable[[], np.ndarray]:
  lengths_B = np.full((prompts_BP.shape[0],), prompts_BP.shape[1], np.int32)
  rng = jax.random.key(0)

  def one() -> np.ndarray:
    return sampler.sample(model, prompts_BP, lengths_B, max_new_tokens=new, rng=rng, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, stop_ids=(), pad_id=0, greedy=greedy,
                          return_logprobs=False).tokens
  return one


def hf_generate(model, prompts_BP: np.ndarray, new: int, greedy: bool,
                args: argparse.Namespace) -> Callable[[], np.ndarray]:
  torch, device = common.torch_setup()
  model.eval()
  inputs = torch.as_tensor(prompts_BP, dtype=torch.long, device=device)
  mode = dict(do_sample=False, top_k=None, top_p=None, temperature=None) if greedy else dict(
      do_sample=True, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)

  def one() -> np.ndarray:
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new,
                         use_cache=True, pad_token_id=0, **mode)
    return out[:, prompts_BP.shape[1]:].cpu().numpy()
  return one


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_flags(parser)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  parser.add_argument("--new", type=int, default=64, help="new tokens per row")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per side and mode (median reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (compilation)")
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=50)
  parser.add_argument("--top_p", type=float, default=0.9)
  common.add_hf_malloc_flag(parser)
  args = parser.parse_args(argv)
  cfg = common.model_config(args)
  torch_device = common.torch_setup()[1]
  print(common.device_line(torch_device))
  print(common.model_line(cfg) + f"; batch {args.batch}, prompt {args.prompt}, new tokens {args.new}")
  prompts_BP = np.random.default_rng(0).integers(1, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
  model = common.our_model(cfg)
  for mode, greedy in (("greedy", True), ("sampled", False)):
    options = dict(new=args.new, greedy=greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    ours = ours_generate(model, prompts_BP, args.new, greedy, args)
    with common.hf_worker(model, "generate", {"prompts_BP": prompts_BP}, json.dumps(options),
                          args.hf_malloc) as (hf, directory):
      if greedy:
        same = (np.load(f"{directory}/tokens.npy") == ours()).all(axis=1)
        print(f"greedy agreement: {int(same.sum())}/{args.batch} rows identical to HF")
      seconds = common.median_seconds({"hf": hf, "ours": ours}, args.steps, args.warmup)
    for name, s in seconds.items():
      print(f"{mode:>7} {name:>4}: {s * 1e3:8.1f} ms/call  {args.batch * args.new / s:9.0f} new tokens/s")
    print(f"ratio ours/hf {mode}: {seconds['hf'] / seconds['ours']:.2f}x tokens/s")


if __name__ == "__main__":
  main()
