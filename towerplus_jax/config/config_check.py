"""Value checks of a stage config, run before anything is written to the workdir.

Each rule names a config key, a predicate on its value and what the value must be; `check(config)` raises one
`ValueError` line per run, e.g. `config.train.steps=-1: must be >= 1`. Keys a stage does not have are skipped.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import ml_collections

from towerplus_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES, preset

Check = tuple[str, Callable[[Any], bool], str]

_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_POSITIVE = (lambda v: v > 0, "must be > 0")

CHECKS: tuple[Check, ...] = (
    ("train.steps", *_AT_LEAST_1),
    ("train.global_batch_size", *_AT_LEAST_1),
    ("train.micro_batches", *_AT_LEAST_1),
    ("train.log_every", *_AT_LEAST_1),
    ("train.eval_every", *_NON_NEGATIVE),
    ("train.eval_steps", *_AT_LEAST_1),
    ("train.checkpoint_every", *_NON_NEGATIVE),
    ("train.keep_checkpoints", lambda v: v >= 1, "must be >= 1 (the final checkpoint is always kept)"),
    ("train.max_nonfinite", *_AT_LEAST_1),
    ("mesh.slices", *_AT_LEAST_1),
    ("data.seq_len", lambda v: v >= 2, "must be >= 2 (a row needs an input and a target token)"),
    ("data.max_prompt_len", *_NON_NEGATIVE),
    ("optimizer.lr", *_POSITIVE),
    ("optimizer.warmup_ratio", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optimizer.end_lr_ratio", *_NON_NEGATIVE),
    ("optimizer.weight_decay", *_NON_NEGATIVE),
    ("optimizer.clip_norm", lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
    ("optimizer.eps", *_POSITIVE),
    ("optimizer.b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("optimizer.b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("rl.num_generations", lambda v: v >= 2, "must be >= 2 (advantages are relative to the group)"),
    ("rl.prompts_per_step", *_AT_LEAST_1),
    ("rl.iterations", *_AT_LEAST_1),
    ("rl.max_completion_len", *_AT_LEAST_1),
    ("rl.temperature", *_POSITIVE),
    ("rl.top_k", lambda v: v >= 0, "must be >= 0 (0 = off)"),
    ("rl.top_p", lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
    ("rl.std_ddof", lambda v: v in (0, 1), "must be 0 (population std) or 1 (Bessel-corrected, as TRL)"),
)


DTYPES = ("float32", "bfloat16", "float16")


def _choices() -> dict[str, tuple[str, ...]]:
  """Keys that name one of a fixed set of values (imported here, not at module level: losses pull in jax)."""
  from towerplus_jax import losses
  from towerplus_jax.data import chat
  return {"model.dtype": DTYPES, "model.param_dtype": DTYPES, "model.remat": REMAT_POLICIES,
          "model.attention": ATTENTION_IMPLS, "data.template": ("auto", *chat.TEMPLATES),
          "loss.name": tuple(losses.names())}


def _get(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _cross_checks(config: ml_collections.ConfigDict) -> list[str]:
  """Rules between keys."""
  errors = []
  train = config.get("train")
  if train is not None and train.micro_batches >= 1 and train.global_batch_size % train.micro_batches:
    errors.append(f"config.train.global_batch_size={train.global_batch_size} is not divisible by "
                  f"config.train.micro_batches={train.micro_batches}")
  rl = config.get("rl")
  if rl is not None and len(rl.reward_weights) != len(rl.rewards):
    errors.append(f"config.rl.reward_weights has {len(rl.reward_weights)} entries for {len(rl.rewards)} "
                  f"config.rl.rewards {tuple(rl.rewards)}: give one weight per reward function")
  return errors


def errors(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """Every rule the config breaks, one line each."""
  out = []
  for key, ok, must in CHECKS:
    present, value = _get(config, key)
    if present and not ok(value):
      out.append(f"{prefix}.{key}={value!r}: {must}")
  for key, allowed in _choices().items():
    present, value = _get(config, key)
    if present and value not in allowed:
      close = difflib.get_close_matches(str(value), allowed, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      out.append(f"{prefix}.{key}={value!r}: must be one of {', '.join(allowed)}{hint}")
  return out + [e.replace("config.", f"{prefix}.") for e in _cross_checks(config)]


def check(config: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the first broken rule of a stage config, or of every stage of a chain config."""
  found = []
  if "stages" in config:
    for name in config.stage_order:
      found += errors(config.stages[name], f"config.stages.{name}")
  else:
    found = errors(config)
  if found:
    more = f" (and {len(found) - 1} more: {'; '.join(found[1:])})" if len(found) > 1 else ""
    raise ValueError(found[0] + more)


def init_source(init_from: str) -> tuple[str, str]:
  """config.init_from 'hf:DIR' / 'ckpt:WORKDIR' -> (kind, path)."""
  kind, _, path = init_from.partition(":")
  if kind not in ("hf", "ckpt") or not path:
    raise ValueError(f"config.init_from={init_from!r}: use '', 'hf:/path/to/hf_folder' or 'ckpt:/path/to/workdir'")
  return kind, path


def check_names(config: ml_collections.ConfigDict) -> None:
  """The names a run resolves (model preset, init_from) fail with one clear line before anything is written."""
  if config.init_from and config.init_from != "previous":  # previous: a chained stage (configs/tower_plus.py)
    init_source(config.init_from)
  else:
    preset(config.model.preset)
