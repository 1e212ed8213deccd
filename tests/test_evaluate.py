"""Evaluation: corpus BLEU/chrF/chrF++ equal sacrebleu's CLI on the written hypotheses; IF-MT prompts and scoring."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from towerplus_jax import sharding
from towerplus_jax.data import chat, derive, sources
from towerplus_jax.evaluate import comet, translation
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(sample_tok):
  tok = sample_tok
  cfg = ModelConfig.tiny("gemma2", vocab_size=1024)
  model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), sharding.make_mesh({}, jax.devices()[:1]))
  return model, tok


def cli(refs, hyps, tmp_path, *extra):
  (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
  (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
  out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"),
                        "-b", "-w", "4", "-f", "text", *extra], capture_output=True, text=True, check=True)
  return [float(x) for x in out.stdout.split()]


def test_scores_match_sacrebleu_cli(tiny, tmp_path):
  model, tok = tiny
  records = [r for r in derive.read_jsonl(sources.resolve_sources("sample:test")[0]) if r["tgt"] != "zh"][:12]
  report = translation.evaluate(model, tok, "gemma", records, str(tmp_path / "out"), max_new_tokens=8, batch_size=8)
  rows = derive.read_jsonl(str(tmp_path / "out" / "hypotheses.jsonl"))
  hyps, refs = [r["hypothesis"] for r in rows], [r["reference"] for r in rows]
  assert len(hyps) == 12 and any(hyps)
  bleu, chrf = cli(refs, hyps, tmp_path, "-m", "bleu", "chrf")
  (chrfpp,) = cli(refs, hyps, tmp_path, "-m", "chrf", "--chrf-word-order", "2")
  overall = report["overall"]
  assert overall["bleu"] == pytest.approx(bleu, abs=1e-4)
  assert overall["chrf"] == pytest.approx(chrf, abs=1e-4)
  assert overall["chrf++"] == pytest.approx(chrfpp, abs=1e-4)
  assert "tok:13a" in overall["bleu_signature"]
  assert set(report["by_pair"]) == {f"en-{r['tgt']}" for r in records}
  assert json.load(open(tmp_path / "out" / "report.json"))["overall"]["chrf"] == overall["chrf"]


def test_ifmt_prompt_carries_rules_and_is_scored(tiny):
  record = derive.read_jsonl(sources.resolve_sources("sample:ifmt")[0])[1]
  prompt = chat.translation_request(record)
  assert 'Translate "Save" as "Guardar".' in prompt and prompt.endswith("Portuguese (Portugal): ")
  report = translation.score([record, record], [record["reference"], "Clique em Salvar."])
  assert report["rule_adherence"] == pytest.approx(0.5)  # the reference satisfies both rules, the other neither


def test_comet_in_the_report_equals_the_real_package(tmp_path):
  """--comet_model: system, per-pair and per-segment COMET of the tiny fixture equal unbabel-comet's scores."""
  data = os.path.join(os.path.dirname(__file__), "data", "comet")
  fixture = json.load(open(os.path.join(data, "scores.json"), encoding="utf-8"))
  records = [{"source": t["src"], "reference": t["ref"], "src": "en", "tgt": ("de", "pt")[i % 2]}
             for i, t in enumerate(fixture["triples"])]
  report = translation.score(records, [t["mt"] for t in fixture["triples"]], os.path.join(data, "regression"))
  real = fixture["regression"]["scores"]
  assert report["comet"] == pytest.approx(fixture["regression"]["system_score"], abs=1e-4)
  assert report["comet_segments"] == pytest.approx(real, abs=1e-4)
  assert report["by_pair"]["en-pt"]["comet"] == pytest.approx(sum(real[1::2]) / len(real[1::2]), abs=1e-4)


def test_cli_reports_comet_as_the_scorer(tiny_hf_model, sample_sp_path, tmp_path):
  """`python -m towerplus_jax.evaluate --hf=... --comet_model=DIR`: report.json carries the system, per-pair and
  per-segment COMET that comet.cached(DIR) gives the written hypotheses."""
  folder = tmp_path / "hf"
  shutil.copytree(tiny_hf_model("gemma2", vocab_size=1024), folder)
  shutil.copy(sample_sp_path, folder / "tokenizer.model")
  data = os.path.join(os.path.dirname(__file__), "data", "comet")
  triples = json.load(open(os.path.join(data, "scores.json"), encoding="utf-8"))["triples"][:6]
  (tmp_path / "test.jsonl").write_text("".join(json.dumps({"source": t["src"], "reference": t["ref"], "src": "en",
                                                           "tgt": ("de", "pt")[i % 2]}) + "\n"
                                               for i, t in enumerate(triples)), encoding="utf-8")
  model_dir = os.path.join(data, "regression")
  out = subprocess.run([sys.executable, "-m", "towerplus_jax.evaluate", f"--hf={folder}",
                        f"--data={tmp_path / 'test.jsonl'}", f"--out={tmp_path / 'eval'}", "--max_new_tokens=6",
                        "--batch_size=6", f"--comet_model={model_dir}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.load(open(tmp_path / "eval" / "report.json", encoding="utf-8"))
  rows = derive.read_jsonl(str(tmp_path / "eval" / "hypotheses.jsonl"))
  expected = comet.cached(model_dir).score([r["source"] for r in rows], [r["hypothesis"] for r in rows],
                                           [r["reference"] for r in rows])
  assert report["comet"] == pytest.approx(expected["system"], abs=1e-5)
  assert report["comet_segments"] == pytest.approx(expected["segments"], abs=1e-5)
  for pair, k in (("en-de", 0), ("en-pt", 1)):
    assert report["by_pair"][pair]["comet"] == pytest.approx(np.mean(expected["segments"][k::2]), abs=1e-5)
