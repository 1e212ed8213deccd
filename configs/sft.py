"""Supervised fine-tuning (SFT): loss on assistant tokens only, through the chat template.

  python -m towerplus_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft --config.init_from=ckpt:/tmp/cpt
  python -m towerplus_jax.main --config=configs/sft.py:gemma2_2b --workdir=gs://BUCKET/sft \
      --config.init_from=ckpt:gs://BUCKET/cpt --config.data.train='/data/sft/*.jsonl'
"""
from towerplus_jax.config.stage_config import base, finish


def get_config(arg: str = "tiny"):
  c = base(arg, loss="sft")
  c.data.train = "sample:chat,sample:parallel"  # chat + translation (Tower+ prompt) examples
  c.data.eval = "sample:test"
  if not c.model.preset.startswith("tiny"):
    c.optimizer.lr = 7e-6
    c.train.steps = 4_000
  return finish(c, arg)
