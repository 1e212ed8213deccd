"""LoRA adapters on a Transformer's projections: W' = W + (alpha / rank) · A B, with A [*in, r] and B [r, *out].

`apply` adds, next to each targeted weight `X` (e.g. `attn.q_DNH`, stacked [G, ...] in a scanned model), two
`nnx.LoRAParam`s `X_lora_a` and `X_lora_b` (B starts at 0, so the adapted model starts as the base) and records the
`Spec` on the model. The layers never read them: `merged` returns the model with every targeted weight replaced by
W', which is what training differentiates (the gradient reaches A and B through the merge). The unmerged model is the
base itself, which is why a LoRA run's reference policy costs no second copy of the weights.

Why not qwix's interception (qwix 0.1.8 `apply_lora_to_model`): it wraps only the NNX model's `__call__`, so
`Transformer.hidden` / `decode` (what the losses, the chunked log-prob kernel and the sampler call) run without the
adapters; and it creates the adapters lazily inside the first call, which fails under `scan_layers` (our `lax.scan`
over the stacked blocks: IndexError in qwix). Its numerics (x A B · alpha / rank, B = 0 at init) are the ones here.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from towerplus_jax.models import layout

# (sub-module of a Block, weight, HF module name, number of input axes of the weight)
PROJECTIONS = (
    ("attn", "q_DNH", "self_attn.q_proj", 1),
    ("attn", "k_DKH", "self_attn.k_proj", 1),
    ("attn", "v_DKH", "self_attn.v_proj", 1),
    ("attn", "o_NHD", "self_attn.o_proj", 2),
    ("mlp", "gate_DF", "mlp.gate_proj", 1),
    ("mlp", "up_DF", "mlp.up_proj", 1),
    ("mlp", "down_FD", "mlp.down_proj", 1),
)
DEFAULT_TARGETS = r"\.(q|k|v|o|gate|up|down)_proj$"
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # the base weights of an adapted model (the adapters: nnx.LoRAParam)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What `apply` did: rank, alpha and the regex (`re.search`) over module names `layers.{i}.self_attn.q_proj`."""
  rank: int
  alpha: float
  targets: str = DEFAULT_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def targeted(model: nnx.Module, spec: Spec) -> list[tuple[str, int, str, str]]:
  """(slot, index, sub-module, weight) of each weight `spec.targets` selects (slot: layers, stack or tail).

  Raises ValueError (one line) when nothing matches, or when a scanned group's layers disagree."""
  cfg = model.cfg
  hits: dict[tuple[str, int, str, str], list[bool]] = {}
  layers: dict[tuple[str, int, str, str], list[int]] = {}
  for i in range(cfg.num_layers):
    slot, _ = layout.layer_slot(cfg, i)
    name, index = slot.split(".")
    for owner, weight, hf, _ in PROJECTIONS:
      key = (name, int(index), owner, weight)
      hits.setdefault(key, []).append(re.search(spec.targets, f"layers.{i}.{hf}") is not None)
      layers.setdefault(key, []).append(i)
  if not any(any(h) for h in hits.values()):
    names = ", ".join(hf for _, _, hf, _ in PROJECTIONS)
    raise ValueError(f"lora.targets={spec.targets!r} matches no module; module names are layers.N.NAME with N < "
                     f"{cfg.num_layers} and NAME one of {names}")
  mixed = [k for k, h in hits.items() if any(h) and not all(h)]
  if mixed:
    _, _, owner, weight = mixed[0]
    raise ValueError(f"lora.targets={spec.targets!r} selects some but not all of layers {layers[mixed[0]]}, which "
                     f"share one stacked {owner}.{weight} under model.scan_layers: target all of them or set "
                     "model.scan_layers=False")
  return [k for k, h in hits.items() if all(h)]


def _split(shape: tuple[int, ...], stacked: bool, weight: str) -> tuple[tuple, tuple, tuple]:
  """(stacked [G] axis or (), input axes, output axes) of a projection weight's shape."""
  n_lead = int(stacked)
  n_in = next(n for _, w, _, n in PROJECTIONS if w == weight)
  return shape[:n_lead], shape[n_lead:n_lead + n_in], shape[n_lead + n_in:]


def apply(model: nnx.Module, spec: Spec, rngs: nnx.Rngs) -> nnx.Module:
  """`model` (a Transformer, changed in place and returned) with adapters on the weights `spec.targets` selects,
  in the weights' dtype. A ~ U(±1/sqrt(fan_in)) (PEFT's kaiming-uniform init), B = 0; each takes its weight's
  logical axes (A its input axes, B its output axes; the rank axis unsplit)."""
  for (name, index, owner, weight) in targeted(model, spec):
    module = getattr(getattr(model, name)[index], owner)
    w = getattr(module, weight)
    lead, ins, outs = _split(w.shape, name == "stack", weight)
    axes = w.get_metadata().get("axes") or (None,) * w.ndim
    n = len(lead) + len(ins)
    bound = 1 / math.sqrt(math.prod(ins))
    a = jax.random.uniform(rngs.params(), (*lead, *ins, spec.rank), w.dtype, -bound, bound)
    setattr(module, weight + A_SUFFIX, nnx.LoRAParam(a, axes=(*axes[:n], None)))
    setattr(module, weight + B_SUFFIX, nnx.LoRAParam(jnp.zeros((*lead, spec.rank, *outs), w.dtype),
                                                     axes=(*axes[:len(lead)], None, *axes[n:])))
  model.lora = spec
  return model


def _delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...], stacked: bool, weight: str) -> jax.Array:
  """A B (unscaled) in the layout of the weight `shape` it adapts."""
  lead, ins, outs = _split(shape, stacked, weight)
  rank = a.shape[-1]
  a2 = a.reshape(*lead, math.prod(ins), rank)
  b2 = b.reshape(*lead, rank, math.prod(outs))
  return jnp.matmul(a2, b2).reshape(shape)


def merged(model: nnx.Module) -> nnx.Module:
  """The model with W + scale · A B in place of every adapted weight (in the wider of W's and A's dtypes); a model
  without adapters as it is."""
  spec = getattr(model, "lora", None)
  if spec is None:
    return model
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  for name, blocks in pure.items():
    if name not in layout.LAYER_KEYS:
      continue
    for block in blocks.values():
      for owner, weight, _, _ in PROJECTIONS:
        sub = block[owner]
        if weight + A_SUFFIX in sub:
          w, a = sub[weight], sub[weight + A_SUFFIX]
          d = _delta(a, sub[weight + B_SUFFIX], w.shape, name == "stack", weight)
          dtype = jnp.promote_types(w.dtype, a.dtype)
          sub[weight] = w.astype(dtype) + spec.scale * d.astype(dtype)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
