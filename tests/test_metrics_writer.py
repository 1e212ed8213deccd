"""The progress line: step, the stage's headline figures under readable names, tokens/s and ETA."""
import logging
import re

from towerplus_jax.training import metrics_writer


def test_progress_line_names_reward_and_throughput(tmp_path, caplog):
  writer = metrics_writer.MetricsWriter(str(tmp_path), 10, 0.0)
  caplog.set_level(logging.INFO)
  for step in (1, 2):
    writer.count_tokens(1000)
    metrics = writer.progress(step, {"loss": 0.5, "reward/mean": 0.25, "reward/std": 0.125, "lr": 1e-4})
  writer.close()
  line = caplog.records[-1].getMessage()
  assert re.fullmatch(r"step 2/10 loss=0\.5 reward=0\.25 lr=0\.0001 tokens/s=\S+ eta=\d+:\d\d:\d\d", line), line
  assert metrics["perf/tokens_per_sec"] > 0
