"""Precomputed reference log-probs: WPO trained on them equals WPO with a frozen reference model in memory."""
import json

import numpy as np

from configs import wpo
from towerplus_jax import reference
from towerplus_jax.data import derive, sources
from towerplus_jax.run import stage


def test_precomputed_reference_equals_frozen_reference(tmp_path):
  """Precomputed in batches of 3 (a padded last batch), trained in batches of 4: equal only if every record got its
  own row's log-probs."""
  prefs = tmp_path / "prefs.jsonl"
  prefs.write_text(derive.render(derive.read_jsonl(sources.resolve_sources("sample:preferences")[0])[:10]),
                   encoding="utf-8")
  c = wpo.get_config("tiny")
  c.data.update(train=str(prefs), seq_len=64)
  c.train.update(steps=3, global_batch_size=4, log_every=1, checkpoint_every=0)
  frozen = stage.train(c, str(tmp_path / "frozen"))

  with_ref = tmp_path / "prefs_ref.jsonl"
  c.train.global_batch_size = 3  # 10 records: the last batch has 1 record and 2 padding rows
  assert reference.precompute(c, str(tmp_path / "scratch"), str(with_ref)) == 10
  c.train.global_batch_size = 4
  rows = [json.loads(l) for l in open(with_ref, encoding="utf-8")]
  assert all(r["ref_chosen_logp"] < 0 and r["ref_rejected_logp"] < 0 for r in rows)
  assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == derive.read_jsonl(str(prefs))
  c.data.update(train=str(with_ref), precomputed_reference=True)
  precomputed = stage.train(c, str(tmp_path / "precomputed"))
  # Reference sums computed in batches of 3 rows vs 4 differ in float32's last bits, and the training steps carry
  # that on: the metrics agree to ~2e-5 relative (8.6e-6 absolute on a fresh jax 0.10.2 install).
  for key in ("loss", "rewards/margins", "logps/chosen", "wpo/weight"):
    np.testing.assert_allclose(precomputed[key], frozen[key], rtol=1e-4, atol=1e-5)
