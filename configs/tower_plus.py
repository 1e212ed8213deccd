"""The whole Tower+ recipe in one run: CPT -> SFT -> WPO -> GRPO, each stage initialised from the previous one's
checkpoint, held-out chrF/BLEU reported after each stage.

  python -m towerplus_jax.main --config=configs/tower_plus.py:tiny --workdir=/tmp/tower_plus
  python -m towerplus_jax.main --config=configs/tower_plus.py:gemma2_2b --workdir=gs://BUCKET/tower_plus \
      --config.stages.cpt.init_from=hf:/path/to/gemma-2-2b --config.stages.cpt.data.train='/data/cpt/*.jsonl' ...
"""
import importlib.util
import os

import ml_collections

from towerplus_jax.config import keys
from towerplus_jax.config.stage_config import build


def _stage_module(name: str):
  """configs/<name>.py next to this file (importable whatever the working directory)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"towerplus_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "tiny"):
  c = build(keys.chain_keys())  # stage_order, eval_data, eval_max_new_tokens
  c.stages = ml_collections.ConfigDict({name: _stage_module(name).get_config(arg) for name in c.stage_order},
                                       type_safe=False)
  for name in c.stage_order[1:]:
    c.stages[name].init_from = "previous"  # = ckpt:WORKDIR/<previous stage>
  return c
