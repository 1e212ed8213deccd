"""KV-cache sampler vs an independent reference: the full forward pass re-run on the growing sequence."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from towerplus_jax import sharding
from towerplus_jax.data import chat
from towerplus_jax.evaluate import sampler
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer

N = 8  # new tokens; prompts up to 8 + 8 new > gemma2 tiny sliding window 8
LENGTHS = np.array([3, 8, 5, 1], np.int32)
PAD = 0


def _prompts(vocab: int) -> np.ndarray:
  tokens = np.random.default_rng(0).integers(1, vocab, (len(LENGTHS), LENGTHS.max())).astype(np.int32)
  tokens[np.arange(tokens.shape[1]) >= LENGTHS[:, None]] = PAD
  return tokens


def _model(case: str, vocab: int = 1024) -> Transformer:
  """Two layers of the tiny model (gemma2: one sliding-window layer, one global) for fast compiles; `<family>_scanned`:
  five scanned layers (two stacked groups, one leftover), with a stacked KV cache."""
  family, _, scanned = case.partition("_")
  cfg = ModelConfig.tiny(family, vocab_size=vocab)
  n = 5 if scanned else 2
  return Transformer(cfg.replace(num_layers=n, layer_types=(cfg.layer_types * 3)[:n], scan_layers=bool(scanned)),
                     rngs=nnx.Rngs(0))


_forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT))


def _full_logits(model: Transformer, rows: list[list[int]]) -> list[np.ndarray]:
  """Full-forward logits [len, V] of each row, right-padded into one batch of width a multiple of 16 (few
  compilations); causal attention, so the padding cannot leak into the rows."""
  width = -(-max(map(len, rows)) // 16) * 16
  batch = np.full((len(rows), width), PAD, np.int32)
  for i, r in enumerate(rows):
    batch[i, :len(r)] = r
  logits = np.asarray(_forward(model, jnp.asarray(batch)))
  return [logits[i, :len(r)] for i, r in enumerate(rows)]


def _reference_greedy(model: Transformer, prompts: list[list[int]], n: int) -> np.ndarray:
  rows = [list(p) for p in prompts]
  for _ in range(n):
    for r, logits in zip(rows, _full_logits(model, rows)):
      r.append(int(np.argmax(logits[-1])))
  return np.array([r[len(p):] for r, p in zip(rows, prompts)])


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference_logprobs(model, tokens_BP, out, temperature: float) -> np.ndarray:
  """log softmax(full-forward logits / T) of each generated token (0 after the row's end)."""
  rows = [list(tokens_BP[b, :LENGTHS[b]]) + list(out.tokens[b, :out.lengths[b]]) for b in range(len(LENGTHS))]
  ref = np.zeros(out.tokens.shape)
  for b, logits in enumerate(_full_logits(model, rows)):
    p, n = LENGTHS[b], out.lengths[b]
    logp = _log_softmax(logits[p - 1:p - 1 + n] / temperature)
    ref[b, :n] = logp[np.arange(n), out.tokens[b, :n]]
  return ref


def _sample(model, tokens_BP, **kw) -> sampler.SampleOutput:
  kw = {"max_new_tokens": N, "rng": jax.random.key(0), "pad_id": PAD, **kw}
  return sampler.sample(model, tokens_BP, LENGTHS, **kw)


@functools.cache
def _case(family: str) -> tuple[Transformer, np.ndarray, np.ndarray]:
  """Model, prompts and the reference greedy continuation."""
  model = _model(family)
  tokens_BP = _prompts(model.cfg.vocab_size)
  ref = _reference_greedy(model, [tokens_BP[b, :LENGTHS[b]] for b in range(len(LENGTHS))], N)
  return model, tokens_BP, ref


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "gemma2_scanned"])
def test_greedy_matches_full_forward_and_logprobs(family):
  model, tokens_BP, ref = _case(family)
  out = _sample(model, tokens_BP, greedy=True)
  np.testing.assert_array_equal(out.tokens, ref)
  np.testing.assert_array_equal(out.lengths, [N] * len(LENGTHS))
  assert out.truncated.all()
  np.testing.assert_allclose(out.logprobs, _reference_logprobs(model, tokens_BP, out, 1.0), atol=2e-4)


def test_stop_token_ends_row_and_pads():
  model, tokens_BP, ref = _case("gemma2")
  stop = int(ref[2, 3])
  out = _sample(model, tokens_BP, greedy=True, stop_ids=(stop, 1023 - stop))
  for b in range(len(LENGTHS)):
    hits = np.flatnonzero(np.isin(ref[b], [stop, 1023 - stop]))
    n = hits[0] + 1 if hits.size else N
    assert out.lengths[b] == n and out.truncated[b] == (not hits.size)
    np.testing.assert_array_equal(out.tokens[b, :n], ref[b, :n])
    assert (out.tokens[b, n:] == PAD).all() and (out.logprobs[b, n:] == 0).all()
  assert out.lengths[2] <= 4 and not out.truncated[2]


def test_temperature_sampling_logprobs_and_determinism():
  model, tokens_BP, _ = _case("gemma2")
  out = _sample(model, tokens_BP, temperature=0.7, rng=jax.random.key(1))
  again = _sample(model, tokens_BP, temperature=0.7, rng=jax.random.key(1))
  other = _sample(model, tokens_BP, temperature=0.7, rng=jax.random.key(2))
  np.testing.assert_array_equal(out.tokens, again.tokens)
  assert (out.tokens != other.tokens).any()
  np.testing.assert_allclose(out.logprobs, _reference_logprobs(model, tokens_BP, out, 0.7), atol=2e-4)


def test_top_k_one_and_tiny_top_p_are_greedy():
  model, tokens_BP, greedy = _case("gemma2")
  np.testing.assert_array_equal(_sample(model, tokens_BP, top_k=1, rng=jax.random.key(3)).tokens, greedy)
  np.testing.assert_array_equal(_sample(model, tokens_BP, top_p=1e-6, rng=jax.random.key(4)).tokens, greedy)


def _numpy_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Hugging Face's TopKLogitsWarper then TopPLogitsWarper (skipped at top_p >= 1), row by row, with a full sort."""
  out = logits.copy()
  for row in out:
    if top_k:
      row[row < np.sort(row)[-top_k]] = -np.inf
    if top_p >= 1:
      continue
    order = np.argsort(-row, kind="stable")
    probs = np.exp(row[order] - row[order[0]])
    probs /= probs.sum()
    drop = np.cumsum(probs) - probs >= top_p
    drop[0] = False
    cutoff = row[order[~drop]].min()
    row[row < cutoff] = -np.inf  # ties with the last kept token stay
  return out


@pytest.mark.parametrize("top_k,top_p", [(2, 1.0), (0, 0.65), (3, 0.5), (0, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.log(np.array([[0.1, 0.4, 0.2, 0.3, 0.0], [0.25, 0.05, 0.45, 0.15, 0.1]], np.float32) + 1e-9)
  got = np.asarray(sampler.filter_logits(jnp.asarray(logits), top_k, top_p))
  np.testing.assert_array_equal(got, _numpy_filter(logits, top_k, top_p))


@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (150, 1.0), (0, 0.9), (0, 0.3), (7, 0.999), (0, 1.0)])
def test_sort_free_filter_keeps_exactly_the_sorted_oracles_set(top_k, top_p):
  """Random rows of a 4000-token vocabulary with ties (values rounded to 1/8): the kept set equals a full sort's.
  top_k=150 with top_p=1 keeps 150 tokens (and their ties): float rounding must not cut the tail."""
  rng = np.random.default_rng(top_k + int(100 * top_p))
  logits = (np.round(rng.normal(0, 2, (6, 4000)) * 8) / 8).astype(np.float32)
  got = np.isfinite(np.asarray(sampler.filter_logits(jnp.asarray(logits), top_k, top_p)))
  want = np.isfinite(_numpy_filter(logits, top_k, top_p))
  np.testing.assert_array_equal(got, want)
  if top_k and top_p >= 1:
    assert (got.sum(-1) >= top_k).all()


@pytest.mark.parametrize("case", ["gemma2", "gemma2_scanned"])
def test_sharded_sampling_equals_unsharded(case):
  _, tokens_BP, expected = _case(case)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(_case(case)[0])
  sharded = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
  with jax.set_mesh(mesh):
    out = _sample(sharded, tokens_BP, greedy=True)
  np.testing.assert_array_equal(out.tokens, expected)


def test_bad_prompt_lengths_are_named():
  model = _model("qwen3")
  with pytest.raises(ValueError, match=r"rows \[1\]"):
    sampler.sample(model, np.ones((2, 4), np.int32), [2, 5], max_new_tokens=2, rng=jax.random.key(0))


class _WordTokenizer:
  """Space-separated words as ids (numbered from 32 on first sight), ids below 32 special: enough for chat."""
  vocab_size, bos_id, eos_id, pad_id = 1024, 2, 1, PAD
  specials = {"<|im_start|>": 3, "<|im_end|>": 4}

  def __init__(self):
    self.words: dict[str, int] = {}

  def encode(self, text: str) -> list[int]:
    return [self.words.setdefault(w, 32 + len(self.words)) for w in text.split(" ")]

  def decode(self, ids) -> str:
    return " ".join(f"w{i}" for i in ids if i >= 32)

  def token_id(self, piece: str) -> int:
    return self.specials[piece]


def test_generate_text_chat_greedy():
  model, tok = _case("qwen3")[0], _WordTokenizer()
  prompts = ["the cat", [{"role": "user", "content": "der Hund schläft"}], "hi", "a b c d"]
  got = sampler.generate_text(model, tok, "chatml", prompts, max_new_tokens=6, batch_size=3)
  stops = chat.stop_ids(tok, "chatml")
  ids = [chat.encode_chat(tok, "chatml", chat.as_messages(p, "user"), add_generation_prompt=True)[0] for p in prompts]
  expected = []
  for row in _reference_greedy(model, ids, 6).tolist():
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    expected.append(tok.decode(row[:cut]))
  assert got == expected
