"""Training metrics: a progress line (step, loss, lr, tokens/s, MFU, ETA), TensorBoard events and metrics.jsonl."""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
from absl import logging
from etils import epath

from towerplus_jax.files import storage

# Peak dense bf16 FLOP/s per chip (vendor figures); MFU is not reported for other devices.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "B200": 2250e12}
# The progress line's figures, in order: metric key -> name shown.
PROGRESS = {"loss": "loss", "reward/mean": "reward", "lr": "lr", "grad_norm": "grad_norm",
            "perf/tokens_per_sec": "tokens/s", "perf/mfu": "mfu", "data/fill": "fill"}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  return None


def _step_of(line: str) -> float:
  """A metrics row's step; a row torn by a kill mid-write counts as after every step (it is dropped)."""
  try:
    return json.loads(line).get("step", 0) if line.strip() else 0
  except json.JSONDecodeError:
    return float("inf")


def drop_rows_after(path: str, step: int) -> int:
  """Remove the rows of a metrics.jsonl with "step" > `step` (rewritten in place); returns how many went."""
  file = epath.Path(path)
  if not file.exists():
    return 0
  lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
  kept = [line for line in lines if _step_of(line) <= step]
  if len(kept) < len(lines):
    tmp = file.parent / (file.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(file)  # atomic on a local disk: the file is never half-written
    logging.info("%s: dropped %d rows logged after step %d (the run resumes from there)", path,
                 len(lines) - len(kept), step)
  return len(lines) - len(kept)


class MetricsWriter:
  """Writes only on process 0. `write(step, metrics)` appends one JSON line and TensorBoard scalars."""

  def __init__(self, workdir: str, total_steps: int, flops_per_token: float, resume_step: int | None = None):
    """`resume_step`: the run resumes from this checkpoint step, so rows logged after it by the interrupted run
    (which a kill lost with their checkpoint) are dropped from metrics.jsonl before the re-run logs them again."""
    self.enabled = jax.process_index() == 0
    self.total_steps, self.flops_per_token = total_steps, flops_per_token
    self.peak = peak_flops_per_device()
    self.t0, self.last_t, self.last_step, self.tokens = time.time(), time.time(), None, 0
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.jsonl = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        drop_rows_after(self.jsonl, resume_step)
      self.tb_dir = os.path.join(workdir, "tensorboard")
      # TensorBoard event files are written locally and copied to cloud storage after each write.
      self.tb_local = self.tb_dir if storage.is_local(workdir) else tempfile.mkdtemp(prefix="tensorboard")
      self.tb = SummaryWriter(self.tb_local)

  def count_tokens(self, n: int) -> None:
    self.tokens += n

  def progress(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """Add throughput figures to `metrics` (since the last call) and print the progress line."""
    now = time.time()
    if self.last_step is not None and now > self.last_t:
      dt = now - self.last_t
      tps = self.tokens / dt
      metrics["perf/tokens_per_sec"] = tps
      metrics["perf/step_time"] = dt / max(step - self.last_step, 1)
      if self.peak:
        metrics["perf/mfu"] = tps * self.flops_per_token / (self.peak * jax.device_count())
      eta = (self.total_steps - step) * metrics["perf/step_time"]
    else:
      eta = float("nan")
    self.last_t, self.last_step, self.tokens = now, step, 0
    shown = " ".join(f"{name}={metrics[k]:.4g}" for k, name in PROGRESS.items() if k in metrics)
    logging.info("step %d/%d %s eta=%s", step, self.total_steps, shown, _hms(eta))
    return metrics

  def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
    storage.append_text(self.jsonl, json.dumps({"step": step, **row}) + "\n")
    for k, v in row.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()
    if self.tb_local != self.tb_dir:
      storage.mirror(self.tb_local, self.tb_dir)

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      if self.tb_local != self.tb_dir:
        storage.mirror(self.tb_local, self.tb_dir)


def _hms(seconds: float) -> str:
  if seconds != seconds:  # nan
    return "?"
  s = int(seconds)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
