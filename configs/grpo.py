"""GRPO with verifiable rewards (RLVR): G sampled completions per prompt, group-normalised advantages,
clipped ratio, optional k3 KL to the frozen initial policy.

  python -m towerplus_jax.main --config=configs/grpo.py:tiny --workdir=/tmp/grpo --config.init_from=ckpt:/tmp/wpo
  python -m towerplus_jax.main --config=configs/grpo.py:gemma2_2b --workdir=gs://BUCKET/grpo \
      --config.init_from=ckpt:gs://BUCKET/wpo --config.data.train=/data/ifmt_prompts.jsonl

The `rl` section (rollout sampling and rewards) is the grpo loss's (config/keys.py); loss.temperature and
loss.max_completion_len are the same fields as rl.temperature and rl.max_completion_len. Reward "comet":
--config.rl.rewards='("chrf","comet")' --config.rl.reward_weights='(1.0,1.0)' --config.rl.comet_model=DIR.
"""
from towerplus_jax.config.stage_config import base, finish


def get_config(arg: str = "tiny"):
  c = base(arg, loss="grpo")
  tiny = c.model.preset.startswith("tiny")
  c.data.train = "sample:ifmt,sample:parallel"  # {"prompt"|"source", "reference"?, "rules"?, "answer"?}
  if tiny:  # translation prompts only: the mean reward then compares across steps
    c.data.train = "sample:parallel"
  c.data.eval = ""
  c.data.pack = False
  c.data.max_prompt_len = 96 if tiny else 1024
  # A field reference, not a copy: `--config.rl.num_generations=2` alone also changes the batch.
  c.train.global_batch_size = c.rl.get_ref("prompts_per_step") * c.rl.get_ref("num_generations")
  c.loss.beta = 0.0 if tiny else 0.04  # k3 KL weight (0 = no reference model in memory)
  c.loss.epsilon_high = 0.28  # DAPO clip-higher
  c.optimizer.warmup_ratio = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.lr = 5e-4 if tiny else 1e-6
  c.train.steps = 30 if tiny else 1_000
  c.train.log_every = 1 if tiny else 10
  return finish(c, arg)
