"""README "your own checkpoint": an HF folder with its own SentencePiece tokenizer -> SFT -> export ->
transformers chat generation that stops at the end of the turn."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import sft
from towerplus_jax.convert import tokenizer_files
from towerplus_jax.data import chat, tokenizers
from towerplus_jax.run import stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family,template", [("gemma2", "gemma"), ("qwen3", "chatml")])
def test_hf_folder_sft_export_chat_stops(family, template, tiny_hf_model, sample_sp_path, tmp_path):
  """The export's tokenizer.json (converted from the SentencePiece model) gives AutoTokenizer our ids whatever the
  family's own tokenizer class (Qwen's is byte-level BPE)."""
  import torch
  import transformers
  folder = str(tmp_path / "my_model")
  shutil.copytree(tiny_hf_model(family, vocab_size=1024), folder)
  shutil.copy(sample_sp_path, os.path.join(folder, "tokenizer.model"))  # the user's tokenizer
  data = tmp_path / "sft.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"Say ok {i}", "completion": "ok"}) + "\n" for i in range(16)))

  c = sft.get_config(f"tiny_{family}")
  c.init_from = f"hf:{folder}"
  c.data.update(train=str(data), eval="", tokenizer="auto", seq_len=32, pack=False)
  c.train.update(steps=40, global_batch_size=8, log_every=10, checkpoint_every=0)
  c.optimizer.update(lr=1e-2, warmup_ratio=0.0)
  workdir = str(tmp_path / "run")
  stage.train(c, workdir)
  out = str(tmp_path / "export")
  run = subprocess.run([sys.executable, "-m", "towerplus_jax.convert.hf", "export", f"--workdir={workdir}",
                        f"--out={out}", "--dtype=float32"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0 and "float32" in run.stdout, run.stderr[-2000:]

  ours = tokenizer_files.tokenizer_in(folder)
  end_of_turn = ours.token_id(chat.END_OF_TURN[template])
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert gen["eos_token_id"][0] == end_of_turn and gen["pad_token_id"] == ours.pad_id
  assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == gen["eos_token_id"]
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert len(tok) == ours.vocab_size  # no extra <mask> past the model's vocabulary
  messages = [{"role": "user", "content": "Say ok 3"}]
  texts = tokenizers.sample_texts()[::25] + [" ".join(tokenizers.CHAT_SYMBOLS) + "\nok  \u65e5\u672c \U0001f600"]
  assert [tok.encode(t, add_special_tokens=False) for t in texts] == [ours.encode(t) for t in texts]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
  assert list(prompt) == chat.encode_chat(ours, template, messages, add_generation_prompt=True)[0]
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  generated = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
  assert generated[-1] == end_of_turn and len(generated) < 20, generated
  assert tok.decode(generated, skip_special_tokens=True).strip() == "ok"
  np.testing.assert_array_equal(generated, chat.encode_chat(ours, template, messages + [
      {"role": "assistant", "content": "ok"}])[0][len(prompt):-1])
