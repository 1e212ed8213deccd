"""Score (src, mt, ref?) triples with a COMET checkpoint folder: tokenisation and input building as unbabel-comet
does them, length bucketing (rows sorted by length, each batch padded to a power-of-two length, at most the
encoder's limit, and to a fixed row count; one compiled program per bucket shape), parameters sharded over the mesh
by their logical axes as the decoder's (embed over fsdp, heads/mlp/vocab over tensor; each tensor placed onto its
sharding as it is read from the checkpoint) and each batch split over the data axes (data, fsdp).

  scorer = Comet.load("/models/wmt22-comet-da")
  scorer.score(sources, hypotheses, references)  # {"system": float, "segments": [float, ...]}
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding
from towerplus_jax.evaluate.comet import checkpoint
from towerplus_jax.evaluate.comet.model import CometConfig, CometModel

# XCOMETMetric's fixed weights: the [mt,src], [mt,ref], [mt,src,ref] regression scores (capped at 1) and the MQM
# score of the decoded error spans; the three inputs' tag probabilities (UnifiedMetric's too); MQM penalty per span
# severity.
XCOMET_SCORE_WEIGHTS = (0.12, 0.33, 0.33, 0.22)
SPAN_WEIGHTS = (0.1667, 0.3333, 0.5)
MQM_PENALTY = {"minor": 1, "major": 5, "critical": 10}


def _bucket(n: int, limit: int) -> int:
  return min(1 << max(n - 1, 1).bit_length(), limit)


def error_spans(probs_TC: np.ndarray, labels: Sequence[str], ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                decode) -> list[dict]:
  """UnifiedMetric.decode for one row's first len(mt tokens) positions: a span starts at a tagged token (argmax not
  "O") after an "O" (its severity is its first token's) and is kept only once an "O" closes it; text = decode(its
  token ids), confidence = the mean of its tokens' top probabilities, start / end = character offsets in the mt."""
  spans, span = [], None
  for t, c in enumerate(np.argmax(probs_TC, -1)):
    if labels[c] != "O":
      if span is None:
        span = {"tokens": [], "confidence": [], "severity": labels[c].split("-")[1], "start": offsets[t][0]}
      span["tokens"].append(ids[t])
      span["confidence"].append(probs_TC[t, c])
      span["end"] = offsets[t][1]
    elif span is not None:
      spans.append({"text": decode(span["tokens"]), "confidence": float(np.mean(span["confidence"])),
                    "severity": span["severity"], "start": span["start"], "end": span["end"]})
      span = None
  return spans


def mqm_score(spans: Sequence[dict]) -> float:
  """xCOMET's MQM-like score of a row's error spans: (25 - min(Σ penalties, 25)) / 25."""
  return (25 - min(sum(MQM_PENALTY.get(s["severity"], 0) for s in spans), 25)) / 25


def _load_sharded(cfg: CometConfig, params: dict, mesh: Mesh, ckpt: str, enc_dir: str) -> CometModel:
  """The model built abstractly and filled tensor by tensor, each read and placed straight onto its NamedSharding
  (every device copying only its part), so the whole model is never on one device."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CometModel(cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.state_shardings(abstract, mesh)
  flat = {".".join(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(abstract)}
  targets = {".".join(str(k) for k in path): leaf.get_value() for path, leaf in nnx.to_flat_state(shardings)}
  missing = sorted(set(flat) - set(params))
  if missing:
    raise checkpoint.CometCheckpointError(f"{ckpt}: missing tensors for {missing[:4]} ({len(missing)} in all)")
  for name, var in flat.items():
    value = params[name]()
    if value.shape != var.shape:
      raise checkpoint.CometCheckpointError(f"{ckpt}: {name} has shape {value.shape}, the encoder's "
                                            f"config.json in {enc_dir} says {var.shape}")
    var.set_value(jax.make_array_from_callback(var.shape, targets[name],
                                               lambda index, v=value: v[index].astype(np.float32)))
  return nnx.merge(graphdef, abstract)


class Comet:
  """A loaded COMET model; `score` is the public entry."""

  def __init__(self, cfg: CometConfig, model: CometModel, tokenizer, mesh: Mesh, batch_size: int = 16):
    self.cfg, self.tokenizer, self.mesh, self.batch_size = cfg, tokenizer, mesh, batch_size
    self.cls_id, self.sep_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    graphdef, state = nnx.split(model)
    out = NamedSharding(mesh, P())
    # Separate programs for the encoder (one per bucket shape, shared by src, mt and ref) and the small head.
    self._sentence = jax.jit(lambda s, t, n: nnx.merge(graphdef, s).sentence(t, n))
    self._head = jax.jit(lambda s, *e: nnx.merge(graphdef, s).regression(*e), out_shardings=out)
    self._unified = jax.jit(lambda s, t, n: nnx.merge(graphdef, s).unified(t, n), out_shardings=out)
    self._tagged = jax.jit(lambda s, t, n: nnx.merge(graphdef, s).tagged(t, n), out_shardings=out)
    self._state = state

  def _regression(self, state, *arrays: jax.Array) -> jax.Array:
    """RegressionMetric on (src_BT, src_B, mt_BT, mt_B, ref_BT, ref_B): token ids and lengths."""
    return self._head(state, *(self._sentence(state, t, n) for t, n in zip(arrays[::2], arrays[1::2])))

  @classmethod
  def load(cls, path: str, *, mesh: Mesh | None = None, batch_size: int = 16, dtype: str = "float32") -> "Comet":
    """From a COMET folder (`checkpoints/model.ckpt` + `hparams.yaml`) or its model.ckpt."""
    from tokenizers import Tokenizer
    ckpt, hparams_path = checkpoint.checkpoint_files(path)
    hparams = checkpoint.read_hparams(hparams_path)
    model_dir = os.path.dirname(hparams_path)
    enc_dir = checkpoint.encoder_folder(str(hparams.get("pretrained_model", "xlm-roberta-large")), model_dir)
    cfg = checkpoint.config_from(hparams, hparams_path, os.path.join(enc_dir, "config.json"), dtype)
    mesh = mesh or sharding.make_mesh({"data": -1})
    model = _load_sharded(cfg, checkpoint.convert(checkpoint.read_state_dict(ckpt), ckpt), mesh, ckpt, enc_dir)
    tokenizer = Tokenizer.from_file(os.path.join(enc_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(cfg.max_positions - 2)
    return cls(cfg, model, tokenizer, mesh, batch_size)

  @property
  def requires_references(self) -> bool:
    return self.cfg.kind == "regression" or tuple(self.cfg.input_segments) == ("mt", "ref")

  def _tokens(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch([str(t) for t in texts])]

  def _concat(self, parts: Sequence[list[int]]) -> list[int]:
    """COMET's Encoder.concat_sequences for one row: every pad id dropped (a literal "<pad>" in a text too), then
    <s> a </s></s> b </s> ..., cut to max_positions when long."""
    parts = [[i for i in p if i != self.cfg.pad_id] for p in parts]
    seq = parts[0]
    for p in parts[1:]:
      seq = [self.cls_id, *seq[1:-1], self.sep_id, self.sep_id, *p[1:-1], self.sep_id]
    if sum(len(p) - 2 for p in parts) > self.cfg.max_positions - (1 + 2 * len(parts)):
      seq = seq[:self.cfg.max_positions]
    return seq

  def _run(self, fn, columns: Sequence[list[list[int]]]) -> list[tuple[np.ndarray, ...]]:
    """fn(state, *per column: token ids [B, T] (pad-filled), lengths [B]) -> array(s) [B, ...] over all rows in
    length buckets; per row, in row order, the tuple of its outputs."""
    n, b = len(columns[0]), self.batch_size
    order = np.argsort([max(len(c[i]) for c in columns) for i in range(n)], kind="stable")
    out: list = [None] * n
    for start in range(0, n, b):
      rows = order[start:start + b]
      t = _bucket(max(len(c[i]) for c in columns for i in rows), self.cfg.max_positions)
      arrays = {}
      for k, col in enumerate(columns):
        tokens_BT = np.full((b, t), self.cfg.pad_id, np.int32)
        tokens_BT[len(rows):, :2] = (self.cls_id, self.sep_id)  # filler rows: a valid empty input
        lengths_B = np.full((b,), 2, np.int32)
        for j, i in enumerate(rows):
          tokens_BT[j, :len(col[i])] = col[i]
          lengths_B[j] = len(col[i])
        arrays[f"{k}_tokens"], arrays[f"{k}_lengths"] = tokens_BT, lengths_B
      batch = sharding.shard_global_batch(arrays, self.mesh)
      results = fn(self._state, *(batch[f"{k}_{a}"] for k in range(len(columns)) for a in ("tokens", "lengths")))
      results = [np.asarray(r, np.float64) for r in (results if isinstance(results, tuple) else (results,))]
      for j, i in enumerate(rows):
        out[i] = tuple(r[j] for r in results)
    return out

  def _scores(self, fn, columns: Sequence[list[list[int]]]) -> np.ndarray:
    return np.array([r[0] for r in self._run(fn, columns)], np.float64)

  def predict(self, srcs: Sequence[str], mts: Sequence[str],
              refs: Sequence[str] | None = None) -> tuple[np.ndarray, list[list[dict]] | None]:
    """(segment scores, error spans per segment where the model has a word-level tagger, else None)."""
    if len(srcs) != len(mts) or (refs is not None and len(refs) != len(mts)):
      raise ValueError(f"COMET: {len(srcs)} sources, {len(mts)} hypotheses, {refs and len(refs)} references")
    if not mts:
      return np.zeros(0), [] if self.cfg.word_level else None
    if refs is None and self.requires_references:
      raise ValueError(f"this COMET model ({self.cfg.kind}, inputs {self.cfg.input_segments}) needs references")
    mt_enc = self.tokenizer.encode_batch([str(t) for t in mts])
    mt, src = [e.ids for e in mt_enc], self._tokens(srcs)
    ref = self._tokens(refs) if refs is not None else None
    if self.cfg.kind == "regression":
      return self._scores(self._regression, [src, mt, ref]), None
    segments = self.cfg.input_segments
    use_src, use_ref = "src" in segments, ref is not None and "ref" in segments
    if use_src and use_ref:  # the [mt, src], [mt, ref] and [mt, src, ref] inputs
      inputs = [(mt, src), (mt, ref), (mt, src, ref)]
    else:
      inputs = [(mt, *([src] if use_src else []), *([ref] if use_ref else []))]
    joint = [[self._concat(p) for p in zip(*cols)] for cols in inputs]
    if not self.cfg.word_level:  # UnifiedMetric: the mean of the inputs' scores
      return np.mean([self._scores(self._unified, [rows]) for rows in joint], axis=0), None
    return self._tagged_scores([self._run(self._tagged, [rows]) for rows in joint], joint[0], mt_enc)

  def segment_scores(self, srcs: Sequence[str], mts: Sequence[str], refs: Sequence[str] | None = None) -> np.ndarray:
    return self.predict(srcs, mts, refs)[0]

  def _tagged_scores(self, outputs: list[list[tuple[np.ndarray, np.ndarray]]], first: Sequence[list[int]],
                     mt_enc: Sequence) -> tuple[np.ndarray, list[list[dict]]]:
    """UnifiedMetric.predict_step with the tagger (XCOMETMetric.predict_step): error spans decoded from the inputs'
    tag probabilities (three inputs: weighted by SPAN_WEIGHTS) over the first len(mt tokens) positions, with the
    token ids of the first joint input there (its padding past its end) and the mt's character offsets, as COMET
    zips them (so a literal "<pad>" dropped from the input shifts the ids against the offsets, as in COMET). Score:
    UnifiedMetric, the inputs' mean; XCOMETMetric, the capped scores weighted (one input: by the three weights'
    sum) plus 0.22 × the MQM score of the spans."""
    score_w = XCOMET_SCORE_WEIGHTS[:3] if len(outputs) == 3 else (sum(XCOMET_SCORE_WEIGHTS[:3]),)
    span_w = SPAN_WEIGHTS if len(outputs) == 3 else (1.0,)
    labels = ("O", *(f"I-{e}" for e in self.cfg.error_labels))
    decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
    final, spans = np.zeros(len(mt_enc)), []
    for i, enc in enumerate(mt_enc):
      n = min(len(enc.offsets), *(len(out[i][1]) for out in outputs))
      ids = (first[i] + [self.cfg.pad_id] * n)[:n]
      probs_TC = sum(w * out[i][1][:n] for w, out in zip(span_w, outputs))
      spans.append(error_spans(probs_TC, labels, ids, enc.offsets, decode))
      if self.cfg.kind == "xcomet":
        final[i] = (sum(w * min(out[i][0], 1.0) for w, out in zip(score_w, outputs))
                    + XCOMET_SCORE_WEIGHTS[3] * mqm_score(spans[-1]))
      else:
        final[i] = np.mean([out[i][0] for out in outputs])
    return final, spans

  def score(self, srcs: Sequence[str], mts: Sequence[str], refs: Sequence[str] | None = None) -> dict:
    """{"system": mean segment score, "segments": [score per triple]} (models with a word-level tagger, xCOMET and
    UnifiedMetric with word_level_training: and "error_spans", per triple a list of {"text", "confidence",
    "severity", "start", "end"} as unbabel-comet's metadata.error_spans); refs=None for reference-free models."""
    seg, spans = self.predict(srcs, mts, refs)
    out = {"system": float(seg.mean()) if seg.size else float("nan"), "segments": [float(s) for s in seg]}
    return out if spans is None else {**out, "error_spans": spans}


@functools.cache
def cached(path: str, batch_size: int = 16, dtype: str = "float32") -> Comet:
  """One loaded model per (folder, batch size, dtype) in this process, on an fsdp mesh over this process's own
  devices: the parameters are sharded over them (XCOMET-XXL fits where one device could not hold it) and the rows
  split over them; each host scores the rows it is given, with no collective across hosts."""
  mesh = sharding.make_mesh({"fsdp": -1}, jax.local_devices())
  return Comet.load(path, mesh=mesh, batch_size=batch_size, dtype=dtype)
