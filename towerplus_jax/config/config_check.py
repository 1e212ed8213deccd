"""Checks of a stage (or chain) config against the key table (config/keys.py), run before anything is written to
the workdir: type, range and allowed values of every key, no undeclared keys, and the rules between keys.

`check(config)` raises one `ValueError` line per run, e.g. `config.train.steps=-1: must be >= 1`. Keys a stage does
not have are skipped.
"""
from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from towerplus_jax.config import keys
from towerplus_jax.models.config import preset

_MUST_BE = {bool: "True or False", int: "an int", float: "a number", str: "a string", tuple: "a tuple"}


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted path, value) of every non-section key."""
  out = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaves(value, f"{prefix}{name}.")
    else:
      out.append((prefix + name, value))
  return out


def _has_path(config: ml_collections.ConfigDict, path: str) -> bool:
  node: Any = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def _did_you_mean(value: Any, options: tuple | list) -> str:
  close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


def _has_type(value: Any, kind: type) -> bool:
  """As ml_collections types a field: an int passes for a float (a bool for neither), a list for a tuple."""
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, (tuple, list) if kind is tuple else kind)


def _problem(key: keys.Key, value: Any) -> str:
  """What is wrong with `value` for `key` ('' = nothing)."""
  kind = keys.value_type(key)
  if not _has_type(value, kind):
    return f"must be {_MUST_BE[kind]}"
  allowed = keys.choices(key)
  if allowed is not None and value not in allowed:
    return f"must be one of {', '.join(str(v) or repr(v) for v in allowed)}{_did_you_mean(value, allowed)}"
  if key.rule is not None and not key.rule.ok(value):
    return key.rule.must
  return ""


def _key_errors(config: ml_collections.ConfigDict, prefix: str, chain: bool) -> dict[str, str]:
  """{path: line} of every key of `config` that breaks its entry in the table, or has none."""
  loss = config.loss.get("name", "") if "loss" in config and not chain else ""
  declared = [k.path for k in keys.KEYS if k.chain == chain]
  out = {}
  for path, value in _leaves(config):
    if chain and path.startswith("stages."):
      continue
    key = keys.find(path, loss, chain)
    if key is None:
      close = difflib.get_close_matches(path, declared, n=1)
      hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
      out[path] = f"{prefix}.{path}={value!r}: no such key (configs/KEYS.md lists them){hint}"
    elif not (isinstance(key.default, keys.SameAs) and _has_path(config, key.default.path)):  # else its source's
      problem = _problem(keys.source(key, loss), value)
      if problem:
        out[path] = f"{prefix}.{path}={value!r}: {problem}"
  return out


def _cross_checks(config: ml_collections.ConfigDict, bad: set[str]) -> list[str]:
  """Rules between keys, among keys that pass their own checks (`bad`: the paths that do not)."""
  errors = []
  train = config.get("train")
  if (train is not None and not bad & {"train.global_batch_size", "train.micro_batches"}
      and train.global_batch_size % train.micro_batches):
    errors.append(f"config.train.global_batch_size={train.global_batch_size} is not divisible by "
                  f"config.train.micro_batches={train.micro_batches}")
  rl = config.get("rl")
  if (rl is not None and not bad & {"rl.rewards", "rl.reward_weights"}
      and len(rl.reward_weights) != len(rl.rewards)):
    errors.append(f"config.rl.reward_weights has {len(rl.reward_weights)} entries for {len(rl.rewards)} "
                  f"config.rl.rewards {tuple(rl.rewards)}: give one weight per reward function")
  return errors


def errors(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """Every rule a stage config, or a chain config and each of its stages, breaks: one line each."""
  if "stages" in config:
    out = list(_key_errors(config, prefix, chain=True).values())
    for name in config.stage_order:
      out += errors(config.stages[name], f"{prefix}.stages.{name}")
    return out
  found = _key_errors(config, prefix, chain=False)
  return [*found.values(), *(e.replace("config.", f"{prefix}.") for e in _cross_checks(config, set(found)))]


def check(config: ml_collections.ConfigDict) -> None:
  """Raise ValueError naming the first broken rule of a stage config, or of every stage of a chain config."""
  found = errors(config)
  if found:
    more = f" (and {len(found) - 1} more: {'; '.join(found[1:])})" if len(found) > 1 else ""
    raise ValueError(found[0] + more)


def init_source(init_from: str) -> tuple[str, str]:
  """config.init_from 'hf:DIR' / 'ckpt:WORKDIR' / 'peft:ADAPTER_DIR' -> (kind, path)."""
  kind, _, path = init_from.partition(":")
  if kind not in ("hf", "ckpt", "peft") or not path:
    raise ValueError(f"config.init_from={init_from!r}: use '', 'hf:/path/to/hf_folder', 'ckpt:/path/to/workdir' or "
                     "'peft:/path/to/adapter_folder'")
  return kind, path


def check_names(config: ml_collections.ConfigDict) -> None:
  """The names a run resolves (model preset, init_from) fail with one clear line before anything is written."""
  if config.init_from and config.init_from != "previous":  # previous: a chained stage (configs/tower_plus.py)
    init_source(config.init_from)
  else:
    preset(config.model.preset)
