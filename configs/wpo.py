"""Weighted preference optimisation (WPO, Zhou et al. 2024) against a frozen reference (the initial policy).

  python -m towerplus_jax.main --config=configs/wpo.py:tiny --workdir=/tmp/wpo --config.init_from=ckpt:/tmp/sft
  python -m towerplus_jax.main --config=configs/wpo.py:gemma2_2b --workdir=gs://BUCKET/wpo \
      --config.init_from=ckpt:gs://BUCKET/sft --config.data.train=/data/prefs.jsonl --config.loss.name=dpo
"""
from towerplus_jax.config.stage_config import base, finish


def get_config(arg: str = "tiny"):
  c = base(arg, loss="wpo")
  c.data.train = "sample:preferences"  # {"prompt","chosen","rejected"} (+ optional precomputed ref_*_logp)
  c.data.eval = ""
  c.data.pack = True  # whole pairs share rows (exact: per-segment sums); False: one right-padded row per side
  c.optimizer.warmup_ratio = 0.1
  if c.model.preset.startswith("tiny"):  # the sample's preferences are learnt visibly: accuracy and margins rise
    c.optimizer.lr = 3e-4
    c.loss.beta = 0.5
    c.train.steps = 30
    c.train.log_every = 1  # the summary's first -> last means need rows
  else:
    c.optimizer.lr = 1e-6  # reference run: 5e-7 … 1e-6, cosine, warmup 0.1, 1–2 epochs
    c.train.global_batch_size = 64
    c.train.steps = 2_000
  return finish(c, arg)
