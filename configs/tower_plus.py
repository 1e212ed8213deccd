"""The whole Tower+ recipe in one run: CPT -> SFT -> WPO -> GRPO, each stage initialised from the previous one's
checkpoint, held-out chrF/BLEU reported after each stage.

  python -m towerplus_jax.main --config=configs/tower_plus.py:tiny --workdir=/tmp/tower_plus
  python -m towerplus_jax.main --config=configs/tower_plus.py:gemma2_2b --workdir=gs://BUCKET/tower_plus \
      --config.stages.cpt.init_from=hf:/path/to/gemma-2-2b --config.stages.cpt.data.train='/data/cpt/*.jsonl' ...
"""
import importlib.util
import os

import ml_collections


def _stage_module(name: str):
  """configs/<name>.py next to this file (importable whatever the working directory)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"towerplus_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


STAGES = {name: _stage_module(name) for name in ("cpt", "sft", "wpo", "grpo")}


def get_config(arg: str = "tiny"):
  c = ml_collections.ConfigDict()
  c.stage_order = tuple(STAGES)  # run in this order, each in WORKDIR/<stage>
  c.stages = ml_collections.ConfigDict({name: mod.get_config(arg) for name, mod in STAGES.items()})
  for name in c.stage_order[1:]:
    c.stages[name].init_from = "previous"  # = ckpt:WORKDIR/<previous stage>
  c.eval_data = "sample:test"  # translation test set scored (chrF, BLEU) after every stage ('' = none)
  c.eval_max_new_tokens = 48  # greedy decoding budget per test sentence
  return c
