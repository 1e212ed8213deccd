"""The whole Tower+ recipe in one run: CPT -> SFT -> WPO -> GRPO, each stage initialised from the previous one's
checkpoint, held-out chrF/BLEU reported after each stage.

  python -m towerplus_jax.main --config=configs/tower_plus.py:tiny --workdir=/tmp/tower_plus
  python -m towerplus_jax.main --config=configs/tower_plus.py:gemma2_2b --workdir=gs://BUCKET/tower_plus \
      --config.stages.cpt.init_from=hf:/path/to/gemma-2-2b --config.stages.cpt.data.train='/data/cpt/*.jsonl' ...
"""
import ml_collections

from configs import cpt, grpo, sft, wpo

STAGES = {"cpt": cpt, "sft": sft, "wpo": wpo, "grpo": grpo}


def get_config(arg: str = "tiny"):
  c = ml_collections.ConfigDict()
  c.stage_order = tuple(STAGES)  # run in this order, each in WORKDIR/<stage>
  c.stages = ml_collections.ConfigDict({name: mod.get_config(arg) for name, mod in STAGES.items()})
  for name in c.stage_order[1:]:
    c.stages[name].init_from = "previous"  # = ckpt:WORKDIR/<previous stage>
  c.eval_data = "sample:test"  # translation test set scored (chrF, BLEU) after every stage ('' = none)
  c.eval_max_new_tokens = 48  # greedy decoding budget per test sentence
  return c
