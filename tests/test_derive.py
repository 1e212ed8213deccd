"""`python -m towerplus_jax.data.derive`: --help prints usage without writing; the shipped pairs are up to date."""
import os

import pytest

from towerplus_jax.data import derive


def test_help_prints_usage_and_writes_nothing(tmp_path, capsys):
  shipped = os.path.join(derive.SAMPLE_DIR, "preferences.jsonl")
  before = os.stat(shipped).st_mtime_ns
  with pytest.raises(SystemExit) as e:
    derive.main(["--help"])
  assert e.value.code == 0 and "usage: python -m towerplus_jax.data.derive" in capsys.readouterr().out
  assert os.stat(shipped).st_mtime_ns == before


def test_shipped_preferences_are_up_to_date(tmp_path):
  out = tmp_path / "prefs.jsonl"
  derive.main([f"--out={out}"])
  with open(os.path.join(derive.SAMPLE_DIR, "preferences.jsonl"), encoding="utf-8") as f:
    assert out.read_text(encoding="utf-8") == f.read()
