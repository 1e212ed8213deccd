"""LoRA adapters on a Transformer's projections: y = x W + (alpha / rank) · (x A) B, with A [*in, r], B [r, *out].

`apply` adds, next to each targeted weight `X` (e.g. `attn.q_DNH`, stacked [G, ...] in a scanned model), two
`nnx.LoRAParam`s `X_lora_a` and `X_lora_b` (B starts at 0, so the adapted model starts as the base) and records the
`Spec` on the model. The layers compute every projection through `project`, which adds the adapter's path when the
weight has one: the base weights are never copied or merged (not in training, not in the sampler), the gradient of
a step is A's and B's only, and with B = 0 the model is exactly its base (x W + scale · (x A) 0 = x W), which is why
a LoRA run's reference policy is a copy of its initial adapters on the same base, not a second copy of the weights.
`store_base` keeps the frozen base in bfloat16 or quantised (QLoRA, models/quant.py); `merged` gives
W' = W + scale · A B as plain weights (the HF export).

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

from towerplus_jax.models import layout, matmul, quant

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


def projections(model: nnx.Module) -> list[tuple[str, nnx.Module, str, bool]]:
  """(slot name, owning module, weight, stacked) of every projection weight of every block."""
  out = []
  for name in layout.LAYER_KEYS:
    for block in getattr(model, name, ()):
      for owner, weight, _, _ in PROJECTIONS:
        out.append((name, getattr(block, owner), weight, name == "stack"))
  return out


def apply(model: nnx.Module, spec: Spec, rngs: nnx.Rngs) -> nnx.Module:
  """`model` (a Transformer, changed in place and returned) with adapters on the weights `spec.targets` selects,
  in the model's param dtype. A ~ U(±1/sqrt(fan_in)) (PEFT's kaiming-uniform init), B = 0; each takes its weight's
  logical axes (A its input axes, B its output axes; the rank axis unsplit)."""
  dtype = jnp.dtype(model.cfg.param_dtype)
  for (name, index, owner, weight) in targeted(model, spec):
    module = getattr(getattr(model, name)[index], owner)
    w = getattr(module, weight)
    lead, ins, outs = _split(w.shape, name == "stack", weight)
    axes = w.get_metadata().get("axes") or (None,) * w.ndim
    n = len(lead) + len(ins)
    bound = 1 / math.sqrt(math.prod(ins))
    a = jax.random.uniform(rngs.params(), (*lead, *ins, spec.rank), dtype, -bound, bound)
    setattr(module, weight + A_SUFFIX, nnx.LoRAParam(a, axes=(*axes[:n], None)))
    setattr(module, weight + B_SUFFIX, nnx.LoRAParam(jnp.zeros((*lead, spec.rank, *outs), dtype),
                                                     axes=(*axes[:len(lead)], None, *axes[n:])))
    module.lora_scale = spec.scale
  model.lora = spec
  return model


def project(module: nnx.Module, weight: str, eqn: str, x: jax.Array) -> jax.Array:
  """`einsum(eqn, x, W)` for the module's weight `weight` (dequantised if stored quantised), plus
  scale · (x A) B when `apply` gave it an adapter (the module has `lora_scale`; qwix's same-named adapters in the
  tests' oracle are not ours); `eqn`'s weight subscripts are its input axes, then its output axes."""
  y = matmul.einsum(eqn, x, quant.read(module, weight, x.dtype))
  a = getattr(module, weight + A_SUFFIX, None)
  if a is None or not hasattr(module, "lora_scale"):
    return y
  x_sub, rest = eqn.split(",")
  w_sub, y_sub = rest.split("->")
  ins = "".join(c for c in w_sub if c in x_sub)
  keep = "".join(c for c in x_sub if c not in ins)
  xa = matmul.einsum(f"{x_sub},{ins}R->{keep}R", x, a[...].astype(x.dtype))
  b = getattr(module, weight + B_SUFFIX)[...].astype(x.dtype)
  return y + module.lora_scale * matmul.einsum(f"{keep}R,R{w_sub[len(ins):]}->{y_sub}", xa, b)


def store_base(model: nnx.Module, dtype: str) -> nnx.Module:
  """The model's base weights (every `nnx.Param` but the adapters; changed in place) in `dtype`, or for int8 / int4
  (QLoRA) its projection weights quantised per output channel (models/quant.py) and the rest in bfloat16."""
  if dtype not in quant.QMAX:
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, BASE)))
    return model
  for _, module, weight, stacked in projections(model):
    w = getattr(module, weight)
    _, ins, _ = _split(w.shape, stacked, weight)
    quant.store(module, weight, tuple(range(int(stacked), int(stacked) + len(ins))), dtype)
  rest = nnx.All(BASE, nnx.Not(quant.Scale), lambda _, x: not jnp.issubdtype(x.dtype, jnp.integer))
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, rest)))
  return model


def _delta(a: jax.Array, b: jax.Array, shape: tuple[int, ...], stacked: bool, weight: str) -> jax.Array:
  """A B (unscaled) in the layout of the weight `shape` it adapts."""
  lead, ins, outs = _split(shape, stacked, weight)
  rank = a.shape[-1]
  a2 = a.reshape(*lead, math.prod(ins), rank)
  b2 = b.reshape(*lead, rank, math.prod(outs))
  return jnp.matmul(a2, b2).reshape(shape)


def merged(model: nnx.Module) -> nnx.Module:
  """A plain model (no adapters, nothing quantised; a copy) with W + scale · A B in place of every adapted weight,
  in the wider of W's and A's dtypes (a quantised W dequantised to A's); a model without adapters as it is."""
  spec = getattr(model, "lora", None)
  if spec is None:
    return model
  model = nnx.merge(*nnx.split(model))
  for _, module, weight, stacked in projections(model):
    a = getattr(module, weight + A_SUFFIX, None)
    quantised = hasattr(module, weight + quant.SCALE_SUFFIX)
    if a is None and not quantised:
      continue
    stored = getattr(module, weight)
    dtype = jnp.dtype(model.cfg.param_dtype) if quantised else jnp.promote_types(stored.dtype, a.dtype)
    w = quant.read(module, weight, dtype)
    if a is not None:
      w = w + spec.scale * _delta(a[...], getattr(module, weight + B_SUFFIX)[...], w.shape, stacked,
                                  weight).astype(dtype)
      for suffix in (A_SUFFIX, B_SUFFIX):
        delattr(module, weight + suffix)
    if quantised:
      delattr(module, weight + quant.SCALE_SUFFIX)
    setattr(module, weight, nnx.Param(w, **stored.get_metadata()))
  model.lora = None
  return model
