"""COMET estimators in Flax NNX: the XLM-RoBERTa encoder, COMET's layer-wise scalar mix, pooling and the heads of
`RegressionMetric` (wmt22-comet-da), `UnifiedMetric` (CometKiwi; with word_level_training its token error-span
tagger) and `XCOMETMetric` (the unified head and the tagger).

Matches unbabel-comet 2.2.7 / transformers XLMRobertaModel and XLMRobertaXLModel in inference mode (dropout off):
RoBERTa position ids (padding_idx + 1 + running count of non-pad tokens, pads at padding_idx), exact (erf) gelu;
XLM-R: embedding LayerNorm and post-LN layers; XLM-R XL/XXL (`pre_ln`): no embedding LayerNorm, pre-LN layers and
a final LayerNorm that the last hidden state includes. The hidden states of the embeddings and of every layer are
mixed by softmax or sparsemax weights × gamma (optionally each normalised over the sentence's unmasked tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

# Encoder parameters carry logical axis names (sharding.LOGICAL_AXIS_RULES: embed -> fsdp, heads/mlp/vocab ->
# tensor) as the decoder's; a bias is split like its kernel's output only along tensor. The small heads and the
# layer mix stay replicated.
_BIAS_AXIS = {"q_heads": "q_heads", "mlp": "mlp"}

# The estimator's activations (hparams activations / final_activation) by torch.nn class name: COMET's
# FeedForward.build_activation takes getattr(torch.nn, name.title()), so "tanh" and "Tanh" work and "ReLU" does not.
HEAD_ACTIVATIONS = {"Tanh": jnp.tanh, "Sigmoid": jax.nn.sigmoid, "Softplus": jax.nn.softplus,
                    "Softsign": jax.nn.soft_sign, "Hardtanh": jax.nn.hard_tanh, "Hardsigmoid": jax.nn.hard_sigmoid,
                    "Hardswish": jax.nn.hard_swish, "Mish": jax.nn.mish, "Identity": lambda x: x}
# The encoder's hidden_act (its config.json; transformers' ACT2FN names).
ENCODER_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu, "silu": jax.nn.silu,
                       "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}


@dataclasses.dataclass(frozen=True)
class CometConfig:
  """Encoder sizes (from the encoder's config.json) and head options (from the checkpoint's hparams.yaml)."""
  kind: Literal["regression", "unified", "xcomet"]
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  pad_id: int = 1
  hidden_act: str = "gelu"
  pre_ln: bool = False  # XLM-R XL/XXL layers (encoder_model "XLM-RoBERTa-XL")
  layer: str | int = "mix"  # "mix" (scalar mix of all hidden states) or one hidden-state index
  layer_transformation: Literal["softmax", "sparsemax"] = "softmax"
  layer_norm: bool = False  # normalise each hidden state over the sentence before mixing
  pool: Literal["avg", "cls", "max", "default"] = "avg"  # RegressionMetric only; UnifiedMetric takes CLS
  hidden_sizes: tuple[int, ...] = (3072, 1024)
  activations: str = "Tanh"
  final_activation: str | None = None
  input_segments: tuple[str, ...] = ("mt", "src", "ref")
  word_level: bool = False  # the token error-span tagger (xCOMET; UnifiedMetric with word_level_training)
  error_labels: tuple[str, ...] = ()  # the tagger's tags besides "O" (xCOMET: minor, major, critical)
  word_layer: int = 24  # hidden state the tagger reads
  dtype: str = "float32"  # compute dtype (params stay float32)

  @property
  def max_positions(self) -> int:
    """Longest input in tokens (as COMET's encoder.max_positions)."""
    return self.max_position_embeddings - 2


def _precision(cfg: CometConfig):
  return jax.lax.Precision.HIGHEST if cfg.dtype == "float32" else None


def _linear(n_in: int, n_out: int, axes: tuple[str, str], cfg: CometConfig, rngs: nnx.Rngs) -> nnx.Linear:
  """An encoder matmul whose kernel [in, out] carries logical axes (its bias those of `out`)."""
  return nnx.Linear(n_in, n_out, dtype=jnp.dtype(cfg.dtype), precision=_precision(cfg), rngs=rngs,
                    kernel_metadata={"axes": axes}, bias_metadata={"axes": (_BIAS_AXIS.get(axes[1]),)})


def _norm(cfg: CometConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                       scale_metadata={"axes": ("norm",)}, bias_metadata={"axes": ("norm",)})


def _embed(n: int, axis: str | None, cfg: CometConfig, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(n, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), rngs=rngs,
                   embedding_metadata={"axes": (axis, "embed")})


class Layer(nnx.Module):
  """One transformer layer. Post-LN (XLM-R): x = LN(x + attn(x)); x = LN(x + W2 act(W1 x)). Pre-LN (XL):
  x = x + attn(LN(x)); x = x + W2 act(W1 LN(x))."""

  def __init__(self, cfg: CometConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.cfg = cfg
    self.query, self.key, self.value = (_linear(d, d, ("embed", "q_heads"), cfg, rngs) for _ in range(3))
    self.attn_out = _linear(d, d, ("q_heads", "embed"), cfg, rngs)
    self.attn_norm = _norm(cfg, rngs)
    self.up = _linear(d, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
    self.down = _linear(cfg.intermediate_size, d, ("mlp", "embed"), cfg, rngs)
    self.mlp_norm = _norm(cfg, rngs)

  def _attention(self, x_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    b, t, d = x_BTD.shape
    h = self.cfg.num_heads
    q_BTNH, k_BTNH, v_BTNH = (f(x_BTD).reshape(b, t, h, d // h) for f in (self.query, self.key, self.value))
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH, precision=_precision(self.cfg)) / (d // h) ** 0.5
    scores_BNTS = jnp.where(mask_BT[:, None, None, :], scores_BNTS.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(v_BTNH.dtype)
    attn_BTD = jnp.einsum("bnts,bsnh->btnh", probs_BNTS, v_BTNH, precision=_precision(self.cfg)).reshape(b, t, d)
    return self.attn_out(attn_BTD)

  def _mlp(self, x_BTD: jax.Array) -> jax.Array:
    return self.down(ENCODER_ACTIVATIONS[self.cfg.hidden_act](self.up(x_BTD)))

  def __call__(self, x_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    if self.cfg.pre_ln:
      x_BTD = x_BTD + self._attention(self.attn_norm(x_BTD), mask_BT)
      return x_BTD + self._mlp(self.mlp_norm(x_BTD))
    x_BTD = self.attn_norm(x_BTD + self._attention(x_BTD, mask_BT))
    return self.mlp_norm(x_BTD + self._mlp(x_BTD))


class Encoder(nnx.Module):
  """XLM-RoBERTa (XL) without the pooler; returns all hidden states [L+1, B, T, D] (embeddings first)."""

  def __init__(self, cfg: CometConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word = _embed(cfg.vocab_size, "vocab", cfg, rngs)
    self.position = _embed(cfg.max_position_embeddings, None, cfg, rngs)
    self.token_type = _embed(cfg.type_vocab_size, None, cfg, rngs)
    self.embed_norm = None if cfg.pre_ln else _norm(cfg, rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _norm(cfg, rngs) if cfg.pre_ln else None

  def __call__(self, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    not_pad_BT = (tokens_BT != self.cfg.pad_id).astype(jnp.int32)
    positions_BT = jnp.cumsum(not_pad_BT, axis=1) * not_pad_BT + self.cfg.pad_id
    x_BTD = self.word(tokens_BT) + self.token_type(jnp.zeros_like(tokens_BT)) + self.position(positions_BT)
    hidden = [x_BTD if self.embed_norm is None else self.embed_norm(x_BTD)]
    for layer in self.layers:
      hidden.append(layer(hidden[-1], mask_BT))
    if self.final_norm is not None:
      hidden[-1] = self.final_norm(hidden[-1])
    return jnp.stack(hidden)


def sparsemax(z_L: jax.Array) -> jax.Array:
  """Euclidean projection onto the simplex (Martins & Astudillo 2016), as entmax.sparsemax on a vector."""
  z_sorted = jnp.sort(z_L)[::-1]
  k = jnp.arange(1, z_L.shape[0] + 1, dtype=z_L.dtype)
  cumsum = jnp.cumsum(z_sorted)
  support = 1 + k * z_sorted > cumsum
  k_z = jnp.sum(support)
  tau = (jnp.sum(jnp.where(support, z_sorted, 0.0)) - 1) / k_z
  return jnp.maximum(z_L - tau, 0.0)


class ScalarMix(nnx.Module):
  """COMET's LayerwiseAttention at inference: gamma · Σ_l w_l h_l, w = softmax or sparsemax of the layer
  weights; with layer_norm each h_l is first normalised by its mean and variance over the unmasked tokens."""

  def __init__(self, cfg: CometConfig):
    self.cfg = cfg
    self.weights_L = nnx.Param(jnp.zeros((cfg.num_layers + 1,), jnp.float32))
    self.gamma = nnx.Param(jnp.ones((), jnp.float32))

  def __call__(self, hidden_LBTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
    w_L = self.weights_L[...]
    w_L = sparsemax(w_L) if self.cfg.layer_transformation == "sparsemax" else jax.nn.softmax(w_L)
    hidden_LBTD = hidden_LBTD.astype(jnp.float32)
    if self.cfg.layer_norm:
      m_1BT1 = mask_BT[None, :, :, None].astype(jnp.float32)
      n_1B11 = jnp.sum(m_1BT1, axis=(2, 3), keepdims=True) * hidden_LBTD.shape[-1]
      mean_LB11 = jnp.sum(hidden_LBTD * m_1BT1, axis=(2, 3), keepdims=True) / n_1B11
      var_LB11 = jnp.sum(((hidden_LBTD * m_1BT1 - mean_LB11) * m_1BT1) ** 2, axis=(2, 3), keepdims=True) / n_1B11
      hidden_LBTD = (hidden_LBTD - mean_LB11) / jnp.sqrt(var_LB11 + 1e-12)
    return self.gamma[...] * jnp.einsum("l,lbtd->btd", w_L, hidden_LBTD, precision=jax.lax.Precision.HIGHEST)


class FeedForward(nnx.Module):
  """COMET's estimator: Linear → act (→ dropout) per hidden size, then Linear to 1 (and the final activation)."""

  def __init__(self, n_in: int, cfg: CometConfig, *, rngs: nnx.Rngs):
    sizes = (n_in, *cfg.hidden_sizes, 1)
    self.cfg = cfg
    self.linears = nnx.List([nnx.Linear(a, b, precision=jax.lax.Precision.HIGHEST, rngs=rngs)
                             for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x_BF: jax.Array) -> jax.Array:
    for linear in self.linears[:-1]:
      x_BF = HEAD_ACTIVATIONS[self.cfg.activations.title()](linear(x_BF))
    x_B1 = self.linears[-1](x_BF)
    if self.cfg.final_activation is not None:
      x_B1 = HEAD_ACTIVATIONS[self.cfg.final_activation.title()](x_B1)
    return x_B1[:, 0]


class CometModel(nnx.Module):
  """Sentence embeddings (mixed hidden states, pooled), the estimator of RegressionMetric / UnifiedMetric and the
  word-level tagger. Every entry takes token ids [B, T] and each row's length [B]: COMET's attention mask is the
  first `length` positions (the HF tokenizer's mask; Encoder.concat_sequences' arange(T) < lengths), so a literal
  "<pad>" in a text is attended to; only XLM-R's position ids and COMET's pooling (mask_fill) skip pad ids."""

  def __init__(self, cfg: CometConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.mix = ScalarMix(cfg) if cfg.layer == "mix" else None
    features = 6 * cfg.hidden_size if cfg.kind == "regression" else cfg.hidden_size
    self.estimator = FeedForward(features, cfg, rngs=rngs)
    self.hidden2tag = nnx.Linear(cfg.hidden_size, 1 + len(cfg.error_labels), precision=jax.lax.Precision.HIGHEST,
                                 rngs=rngs) if cfg.word_level else None

  def _encode(self, tokens_BT: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(all hidden states [L+1, B, T, D], embeddings [B, T, D] (float32) of the configured layer or mix, mask)."""
    mask_BT = jnp.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]
    hidden_LBTD = self.encoder(tokens_BT, mask_BT)
    if self.mix is not None:
      return hidden_LBTD, self.mix(hidden_LBTD, mask_BT), mask_BT
    return hidden_LBTD, hidden_LBTD[int(self.cfg.layer)].astype(jnp.float32), mask_BT

  def sentence(self, tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """Pooled sentence embedding [B, D] as CometModel.compute_sentence_embedding: "avg" sums the non-pad ids'
    embeddings and divides by the length."""
    hidden_LBTD, emb_BTD, mask_BT = self._encode(tokens_BT, lengths_B)
    if self.cfg.pool == "default":  # the last layer's CLS, whatever the mix
      return hidden_LBTD[-1, :, 0].astype(jnp.float32)
    keep_BT1 = (tokens_BT != self.cfg.pad_id)[..., None]
    if self.cfg.pool == "avg":
      return jnp.sum(jnp.where(keep_BT1, emb_BTD, 0.0), axis=1) / jnp.sum(mask_BT, axis=1, keepdims=True)
    if self.cfg.pool == "max":
      return jnp.max(jnp.where(keep_BT1, emb_BTD, -jnp.inf), axis=1)
    return emb_BTD[:, 0]

  def regression(self, src_BD: jax.Array, mt_BD: jax.Array, ref_BD: jax.Array) -> jax.Array:
    """RegressionMetric on sentence embeddings: [mt, ref, mt·ref, |mt−ref|, mt·src, |mt−src|] → estimator."""
    mt, ref, src = mt_BD, ref_BD, src_BD
    return self.estimator(jnp.concatenate([mt, ref, mt * ref, jnp.abs(mt - ref), mt * src, jnp.abs(mt - src)], 1))

  def unified(self, tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """UnifiedMetric on one joint input (mt, src and/or ref concatenated): CLS of the mix → estimator [B]."""
    return self.estimator(self._encode(tokens_BT, lengths_B)[1][:, 0])

  def tagged(self, tokens_BT: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """UnifiedMetric.forward with its word-level tagger (XCOMETMetric's too) on one joint input: (sentence score
    [B], tag probabilities [B, T, 1 + labels] from hidden state word_layer)."""
    hidden_LBTD, emb_BTD, _ = self._encode(tokens_BT, lengths_B)
    logits_BTC = self.hidden2tag(hidden_LBTD[self.cfg.word_layer].astype(jnp.float32))
    return self.estimator(emb_BTD[:, 0]), jax.nn.softmax(logits_BTC, axis=-1)
