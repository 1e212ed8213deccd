"""Continued pretraining (CPT): next-token loss on packed monolingual + parallel text.

  python -m towerplus_jax.main --config=configs/cpt.py:tiny --workdir=/tmp/cpt
  python -m towerplus_jax.main --config=configs/cpt.py:gemma2_2b --workdir=gs://BUCKET/cpt \
      --config.init_from=hf:/path/to/gemma-2-2b --config.data.train='/data/cpt/*.jsonl'
"""
from towerplus_jax.config.stage_config import base, finish


def get_config(arg: str = "tiny"):
  c = base(arg, loss="lm")
  c.data.train = "sample:mono,sample:parallel"  # ~2/3 monolingual, ~1/3 parallel in the Tower+ mix
  c.data.eval = "sample:test"
  c.loss.z_loss = 0.0  # add z_loss·logsumexp² to keep logits bounded (1e-4 is common)
  if not c.model.preset.startswith("tiny"):
    c.optimizer.lr = 1e-5
  return finish(c, arg)
