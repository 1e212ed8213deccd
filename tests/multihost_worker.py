"""Child of tests/test_multihost.py: `python tests/multihost_worker.py JOBS_JSON` runs each job {"config": NAME,
"workdir": DIR} (or {"heldout": STAGE_DIR, "data": JSONL}: the end-of-stage held-out evaluation) in this process's
JAX layout (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); process 0 writes DIR/results.json, with
the rows each process scored (GRPO rewards) or decoded (held-out) per call. The configs and counters are shared with
the single-process reference runs of the test."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import ml_collections

from configs import tower_plus

SCORED: list[int] = []  # completions per call of the `count_rows` reward on this process
DECODED: list[int] = []  # prompt rows per sampler.sample call on this process (inside `count_decoded_rows`)


def count_rows(prompts, completions, **columns) -> list[None]:
  """A reward (weight 0, every value None: it changes nothing) that records how many completions it was given."""
  SCORED.append(len(completions))
  return [None] * len(completions)


@contextlib.contextmanager
def count_decoded_rows():
  """Record the prompt rows of every sampler.sample call in DECODED."""
  from towerplus_jax.evaluate import sampler
  sample = sampler.sample

  def counted(model, prompt_tokens_BP, *args, **kwargs):
    DECODED.append(len(prompt_tokens_BP))
    return sample(model, prompt_tokens_BP, *args, **kwargs)

  sampler.sample = counted
  try:
    yield
  finally:
    sampler.sample = sample


def heldout_config(data: str) -> ml_collections.ConfigDict:
  """What main's end-of-stage held-out evaluation reads from a chain config."""
  return ml_collections.ConfigDict({"eval_data": data, "eval_max_new_tokens": 8})


def stages_config() -> ml_collections.ConfigDict:
  """SFT -> WPO (packed) -> GRPO (packed, LoRA), a few tiny steps each (checkpoints every 2 steps, all kept), no
  held-out decoding."""
  c = tower_plus.get_config("tiny")
  c.stage_order = ("sft", "wpo", "grpo")
  c.eval_data = ""
  for name in c.stage_order:
    # Adam turns float reduction-order noise on near-zero gradients into updates of up to a few % of lr, so a
    # small lr keeps 2-process vs 1-process parameters within 1e-6 while a wrong batch still moves them by ~lr.
    c.stages[name].optimizer.lr = 1e-5
    c.stages[name].data.seq_len = 64
    c.stages[name].train.update(steps=2, log_every=1, checkpoint_every=2, keep_checkpoints=5, eval_steps=2)
  c.stages.sft.train.steps = 4
  c.stages.wpo.data.update(max_prompt_len=32, pack=True)  # packed pairs: rows and per-pair fields split over hosts
  c.stages.wpo.optimizer.eps = 1e-4  # WPO's near-zero gradients: at eps=1e-8 their rounding noise moves params ~lr
  grpo = c.stages.grpo
  grpo.rl.update(prompts_per_step=4, num_generations=4, max_completion_len=8,
                 rewards=(*grpo.rl.rewards, "multihost_worker:count_rows"),
                 reward_weights=(*grpo.rl.reward_weights, 0.0))
  grpo.rl.iterations = 2  # μ > 1: old log-probs by a training forward pass, replicated onto every process
  grpo.train.global_batch_size = 16
  grpo.data.update(max_prompt_len=56, pack=True)  # packed rollout rows, the same on every host
  grpo.lora.update(rank=4, alpha=8.0, base_dtype="float32")  # adapters on WPO's merged weights, sampled as trained
  return c


def sft_config() -> ml_collections.ConfigDict:
  """The SFT stage of `stages_config` alone (for checkpoint hand-over between process counts)."""
  c = stages_config().stages.sft
  c.init_from = ""
  return c


CONFIGS = {"stages": stages_config, "sft": sft_config}


def run_job(name: str, workdir: str) -> dict:
  """{stage: last metrics} of one job."""
  from towerplus_jax.run import chain
  config = CONFIGS[name]()
  results = chain.run(config, workdir)
  return results if "stages" in config else {name: results}


def die_or_wait(process_id: int) -> None:
  """Process `process_id` dies at once; the others block in a collective that it never joins."""
  import jax
  from jax.experimental import multihost_utils
  if jax.process_index() == process_id:
    os._exit(3)
  multihost_utils.sync_global_devices("never completes")


def gathered(counts: list[int]) -> list[list[int]]:
  """[process][call] counts of every process."""
  import numpy as np
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int64))).tolist()


def run_heldout(stage_dir: str, data: str) -> dict:
  from towerplus_jax.run import chain
  with count_decoded_rows():
    scores = chain.held_out_scores(heldout_config(data), stage_dir)
  return {"heldout": scores, "decoded_rows": gathered(DECODED)}


def main_(jobs: list[dict]) -> None:
  sys.modules["multihost_worker"] = sys.modules["__main__"]  # the reward "multihost_worker:count_rows" counts here
  from towerplus_jax import distributed
  distributed.initialize()
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  for job in jobs:
    if "die" in job:
      die_or_wait(job["die"])
      continue
    if "heldout" in job:
      workdir, results = job["heldout"], run_heldout(job["heldout"], job["data"])
    else:
      SCORED.clear()
      workdir, results = job["workdir"], run_job(job["config"], job["workdir"])
      if SCORED:  # a GRPO stage ran
        results["reward_rows"] = gathered(SCORED)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, default=float)


if __name__ == "__main__":
  main_(json.loads(sys.argv[1]))
