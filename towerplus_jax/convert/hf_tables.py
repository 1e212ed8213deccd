"""The key tables of the HF <-> towerplus_jax conversion: one per family, each row (HF tensor name, our parameter
path, layout); `{i}` stands for the layer index, whose params live at `layers.{i}` or, in a scanned model, in one row
of a stacked array (models/layout.py). HF stores a Linear weight as [out, in]; we store einsum layouts with the input
axes first (q [D, N, H], o [N, H, D], gate [D, F]). Norm weights are stored the same way on both sides (Gemma's
(1 + w) convention is shared with HF)."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import numpy as np

from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.layout import layer_slot


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one of our arrays is stored by HF. `same`: identical; `flat`: HF keeps it 1-D ([N, H] <-> [N*H]);
  `linear`: an nn.Linear weight [out, in] whose inputs are our first `n_in` axes (q [D,N,H] <-> [N*H, D])."""

  form: Literal["same", "flat", "linear"]
  n_in: int = 1

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.form == "same":
      return tuple(shape)
    if self.form == "flat":
      return (math.prod(shape),)
    return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.form == "same":
      return x
    if self.form == "flat":
      return x.reshape(-1)
    return x.reshape(math.prod(x.shape[:self.n_in]), -1).T

  def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (x.T if self.form == "linear" else x).reshape(shape)


SAME, FLAT, LINEAR, LINEAR2 = Layout("same"), Layout("flat"), Layout("linear", 1), Layout("linear", 2)

_L, _O = "model.layers.{i}.", "layers.{i}."
_MODEL = (
    ("model.embed_tokens.weight", "embedder.table_VD", SAME),
    ("model.norm.weight", "final_norm.scale", SAME),
    ("lm_head.weight", "lm_head_DV", LINEAR),  # only untied models have it
)
_DECODER = (
    (_L + "input_layernorm.weight", _O + "pre_attn_norm.scale", SAME),
    (_L + "self_attn.q_proj.weight", _O + "attn.q_DNH", LINEAR),
    (_L + "self_attn.k_proj.weight", _O + "attn.k_DKH", LINEAR),
    (_L + "self_attn.v_proj.weight", _O + "attn.v_DKH", LINEAR),
    (_L + "self_attn.o_proj.weight", _O + "attn.o_NHD", LINEAR2),
    (_L + "mlp.gate_proj.weight", _O + "mlp.gate_DF", LINEAR),
    (_L + "mlp.up_proj.weight", _O + "mlp.up_DF", LINEAR),
    (_L + "mlp.down_proj.weight", _O + "mlp.down_FD", LINEAR),
)
_QWEN_NORMS = ((_L + "post_attention_layernorm.weight", _O + "pre_mlp_norm.scale", SAME),)
_GEMMA_NORMS = (
    (_L + "post_attention_layernorm.weight", _O + "post_attn_norm.scale", SAME),
    (_L + "pre_feedforward_layernorm.weight", _O + "pre_mlp_norm.scale", SAME),
    (_L + "post_feedforward_layernorm.weight", _O + "post_mlp_norm.scale", SAME),
)
_QKV_BIAS = (
    (_L + "self_attn.q_proj.bias", _O + "attn.q_bias_NH", FLAT),
    (_L + "self_attn.k_proj.bias", _O + "attn.k_bias_KH", FLAT),
    (_L + "self_attn.v_proj.bias", _O + "attn.v_bias_KH", FLAT),
)
_QK_NORM = (
    (_L + "self_attn.q_norm.weight", _O + "attn.q_norm.scale", SAME),
    (_L + "self_attn.k_norm.weight", _O + "attn.k_norm.scale", SAME),
)
TABLES = {
    "gemma2": _MODEL + _DECODER + _GEMMA_NORMS,
    "gemma3": _MODEL + _DECODER + _GEMMA_NORMS + _QK_NORM,
    "qwen2": _MODEL + _DECODER + _QWEN_NORMS + _QKV_BIAS,
    "qwen3": _MODEL + _DECODER + _QWEN_NORMS + _QK_NORM,
}
# HF tensors that carry no weights of the text decoder.
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^(model\.)?(vision_tower|multi_modal_projector)\.")


def key_map(cfg: ModelConfig, our_paths: set[str]) -> dict[str, tuple[str, int | None, Layout]]:
  """HF tensor name -> (our path, row of its stacked layer axis or None, layout) for every parameter of a model of
  `cfg` (rows it lacks are skipped)."""
  out = {}
  for hf, ours, layout in TABLES[cfg.family]:
    if "{i}" not in hf:
      rows = [(hf, ours, None)]
    else:
      rows = [(hf.format(i=i), slot + ours[len(_O) - 1:], row)
              for i in range(cfg.num_layers) for slot, row in [layer_slot(cfg, i)]]
    out.update({name: (path, row, layout) for name, path, row in rows if path in our_paths})
  uncovered = our_paths - {p for p, _, _ in out.values()}
  if uncovered:
    raise ValueError(f"no HF name for parameter(s) {sorted(uncovered)} of a {cfg.family} model")
  return out
