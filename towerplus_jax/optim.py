"""Optimizer: optax AdamW with warmup + cosine/linear/constant decay, global-norm clipping, a weight-decay mask
(no decay on norm scales and biases) and a non-finite-update guard."""
from __future__ import annotations

import jax
import ml_collections
import optax

# optax.apply_if_finite gives up (applies NaNs) after this many; the trainer stops far earlier (train.max_nonfinite).
MAX_NONFINITE = 1 << 30


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(cfg.warmup_ratio * total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, end, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}; choose cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
  """True where weight decay applies: matrices, not norm scales or biases (named `scale` / `*bias*`)."""
  def one(path, p):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return p.ndim >= 2 and not any("bias" in n or n == "scale" for n in names)
  return jax.tree_util.tree_map_with_path(one, params)


def make(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask,
                  mu_dtype=cfg.get("mu_dtype") or None),  # absent in older configs: the param dtype
  )
  return optax.apply_if_finite(tx, MAX_NONFINITE), lr


def nonfinite_counts(opt_state) -> tuple[jax.Array, jax.Array]:
  """(consecutive, total) skipped updates, from optax.apply_if_finite's state."""
  return opt_state.notfinite_count, opt_state.total_notfinite
