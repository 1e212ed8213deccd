"""GRPO with verifiable rewards (RLVR): G sampled completions per prompt, group-normalised advantages,
clipped ratio, optional k3 KL to the frozen initial policy.

  python -m towerplus_jax.main --config=configs/grpo.py:tiny --workdir=/tmp/grpo --config.init_from=ckpt:/tmp/wpo
  python -m towerplus_jax.main --config=configs/grpo.py:gemma2_2b --workdir=gs://BUCKET/grpo \
      --config.init_from=ckpt:gs://BUCKET/wpo --config.data.train=/data/ifmt_prompts.jsonl
"""
import ml_collections

from towerplus_jax.config.stage_config import base, finish


def rl_section(tiny: bool) -> ml_collections.ConfigDict:
  rl = ml_collections.ConfigDict()
  rl.num_generations = 4 if tiny else 8  # G completions per prompt
  rl.prompts_per_step = 4 if tiny else 32  # prompts per rollout (rows per step = prompts_per_step · G)
  rl.iterations = 1  # μ: optimizer steps per rollout batch (> 1: old log-probs by a training forward pass)
  rl.max_completion_len = 24 if tiny else 512  # new tokens per completion
  rl.temperature = 1.0  # sampling temperature (loss.temperature is the same field)
  rl.top_k = 0  # 0 = off
  rl.top_p = 1.0  # 1 = off
  rl.scale_rewards = True  # divide advantages by the group std (False = Dr.GRPO)
  rl.std_ddof = 1  # group std: 1 = Bessel-corrected (TRL, Tunix), 0 = population std
  rl.mask_truncated = False  # drop completions that hit max_completion_len from the loss
  # Names in towerplus_jax.rl.rewards or dotted paths pkg.mod:fn. Tiny: chrF alone, the reward a tiny model
  # raises visibly in 30 steps (rules and format rewards stay near constant there and only add noise to the mean).
  rl.rewards = ("chrf",) if tiny else ("chrf", "rules", "format")
  rl.reward_weights = (1.0,) if tiny else (1.0, 1.0, 0.2)  # one weight per reward function
  # Reward "comet": --config.rl.rewards='("chrf","comet")' --config.rl.reward_weights='(1.0,1.0)' plus
  # --config.rl.comet_model=DIR (a COMET folder; wmt22-comet-da needs references, CometKiwi scores rows without).
  # Each process scores its own rows on an fsdp mesh over its local devices (params sharded over them, so
  # XCOMET-XXL fits; rows split over them), independent of the policy's mesh and with no cross-host collective.
  rl.comet_model = ""  # COMET folder (checkpoints/model.ckpt + hparams.yaml) for the "comet" reward
  rl.comet_batch_size = 16  # COMET rows scored together (one compiled program per length bucket)
  return rl


def get_config(arg: str = "tiny"):
  c = base(arg, loss="grpo")
  tiny = c.model.preset.startswith("tiny")
  c.rl = rl_section(tiny)
  c.data.train = "sample:ifmt,sample:parallel"  # {"prompt"|"source", "reference"?, "rules"?, "answer"?}
  if tiny:  # translation prompts only: the mean reward then compares across steps
    c.data.train = "sample:parallel"
  c.data.eval = ""
  c.data.pack = False
  c.data.max_prompt_len = 96 if tiny else 1024
  # Field references, not copies: `--config.rl.temperature=0.7` alone also changes the loss's ratio temperature.
  c.train.global_batch_size = c.rl.get_ref("prompts_per_step") * c.rl.get_ref("num_generations")
  c.loss.max_completion_length = c.rl.get_ref("max_completion_len")
  c.loss.temperature = c.rl.get_ref("temperature")
  c.loss.beta = 0.0 if tiny else 0.04  # k3 KL weight (0 = no reference model in memory)
  c.loss.epsilon_high = 0.28  # DAPO clip-higher
  c.optimizer.warmup_ratio = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.lr = 5e-4 if tiny else 1e-6
  c.train.steps = 30 if tiny else 1_000
  c.train.log_every = 1 if tiny else 10
  return finish(c, arg)
