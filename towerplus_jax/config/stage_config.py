"""The config every stage file in configs/ starts from: `base(arg, loss=...)`, every key of the stage at its default
(config/keys.py declares them: default, doc, check; configs/KEYS.md lists them); a stage edits what differs and ends
with `return finish(c, arg)`.

`arg` is `PRESET[,runlocal]`: a model preset (`tiny`, `tiny_qwen3`, `gemma2_2b`, `qwen2_5_7b`, ...) and optionally
`runlocal`, which shrinks steps/batch/length so any preset's pipeline can be smoke-tested on one machine; `finish`
applies it last, over whatever the stage set.
"""
from __future__ import annotations

import ml_collections

from towerplus_jax.config import keys
from towerplus_jax.models import config as model_config


def parse_arg(arg: str) -> tuple[str, bool]:
  """`PRESET[,runlocal]` -> (preset, runlocal); an unknown preset or flag fails here, before any run starts."""
  preset, *flags = (arg or "tiny").split(",")
  unknown = set(flags) - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config flags {sorted(unknown)}; the config argument is PRESET[,runlocal]")
  model_config.preset(preset)
  return preset, "runlocal" in flags


def base(arg: str, *, loss: str) -> ml_collections.ConfigDict:
  """Every key of a stage training `loss`, at its default: config/keys.py (configs/KEYS.md)."""
  preset, _ = parse_arg(arg)
  return build(keys.stage_keys(loss), preset, loss)


def build(table: tuple[keys.Key, ...], preset: str = "", loss: str = "") -> ml_collections.ConfigDict:
  """A config of `table`'s keys at their defaults. Not type-safe: a wrong type set in a config file reaches
  config_check, which names the key and its type (`--config.*` flags are still parsed as their key's type)."""
  c = ml_collections.ConfigDict(type_safe=False)

  def section(path: str) -> tuple[ml_collections.ConfigDict, str]:
    *parents, name = path.split(".")
    node = c
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict(type_safe=False)
      node = node[part]
    return node, name

  for key in table:
    node, name = section(key.path)
    node[name] = keys.default(key, preset, loss)
  paths = {k.path for k in table}
  for key in (k for k in table if isinstance(k.default, keys.SameAs) and k.default.path in paths):
    # One field with its source (a reference): setting either key sets both.
    node, name = section(key.path)
    source, source_name = section(key.default.path)
    node[name] = source.get_ref(source_name)
  return c


def finish(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """The stage's last word: `runlocal` (if `arg` asks) shrinks steps, batch, lengths and rollouts of any preset."""
  if not parse_arg(arg)[1]:
    return c
  c.model.remat = "none"
  c.data.seq_len = 256
  c.train.update(steps=10, eval_steps=2, log_every=1, checkpoint_every=5)
  if "rl" in c:  # the batch and the loss's completion length follow (field references)
    c.rl.update(num_generations=2, prompts_per_step=1, max_completion_len=32)
  else:
    c.train.global_batch_size = 2
    c.data.max_prompt_len = 128
  return c
