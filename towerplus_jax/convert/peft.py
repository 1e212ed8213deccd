"""PEFT LoRA adapter folders (what `peft.PeftModel.from_pretrained(base, folder)` loads), written from a run's
adapters and read back (`init_from=peft:DIR`: a stage from base + adapter), and the record of a LoRA run's base in
its workdir (`lora_base.json`: where the base came from, its fingerprint, the adapters' spec).

Key table: our adapter `X_lora_a` [*lead, *in, r] / `X_lora_b` [*lead, r, *out] of layer i's projection `NAME`
(models/lora.py PROJECTIONS, HF's module names) <-> `base_model.model.model.layers.{i}.NAME.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r], in and out flattened as HF flattens the projection's weight (convert/hf_tables.py).
W' = W + (lora_alpha / r) · B A in PEFT's terms.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from towerplus_jax import sharding
from towerplus_jax.models import lora
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.layout import layer_slot

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
BASE_FILE = "lora_base.json"
KEY = "base_model.model.model.layers.{i}.{name}.lora_{ab}.weight"


def adapter_tensors(adapters: Mapping, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], list[str]]:
  """({PEFT key: tensor} of a pure dict of adapters (`nnx.to_pure_dict` of the `nnx.LoRAParam` state), the adapted
  module names `layers.{i}.NAME`)."""
  tensors, modules = {}, []
  for i in range(cfg.num_layers):
    slot, row = layer_slot(cfg, i)
    name, index = slot.split(".")
    block = adapters.get(name, {}).get(int(index), {})
    for owner, weight, hf, n_in in lora.PROJECTIONS:
      sub = block.get(owner, {})
      if weight + lora.A_SUFFIX not in sub:
        continue
      a, b = (sharding.to_host(sub[weight + s]) for s in (lora.A_SUFFIX, lora.B_SUFFIX))
      a, b = (a, b) if row is None else (a[row], b[row])
      tensors[KEY.format(i=i, name=hf, ab="A")] = a.reshape(-1, a.shape[-1]).T  # [r, in]
      tensors[KEY.format(i=i, name=hf, ab="B")] = b.reshape(b.shape[0], -1).T  # [out, r]
      modules.append(f"layers.{i}.{hf}")
  return tensors, modules


def target_modules(modules: list[str], num_layers: int) -> list[str]:
  """PEFT's `target_modules`: short names (`q_proj`) where every layer has the projection, else full module names."""
  short = sorted({m.rsplit(".", 1)[1] for m in modules})
  if len(modules) == len(short) * num_layers:
    return short
  return [f"model.{m}" for m in modules]


def base_name(record: dict) -> str:
  """PEFT's `base_model_name_or_path` of a run's base: the HF folder it started from (through an adapter too), else
  the record's description."""
  kind, _, path = (record.get("init_from") or "").partition(":")
  if kind == "hf":
    return path
  if kind == "peft":
    return read_adapter(path)[1]
  return record["base"]


def save_adapter(adapters: Mapping, cfg: ModelConfig, spec: lora.Spec, base: str, out_dir: str,
                 dtype: str = "float32") -> None:
  """Write a PEFT adapter folder (adapter_config.json, adapter_model.safetensors) into `out_dir` (process 0)."""
  tensors, modules = adapter_tensors(adapters, cfg)
  if jax.process_index() != 0:
    return
  np_dtype = np.dtype(jnp.dtype(dtype))
  tmp = out_dir.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  safetensors.numpy.save_file({k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()},
                              os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": 0.0, "target_modules": target_modules(modules, cfg.num_layers), "bias": "none",
            "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base}
  epath.Path(tmp, CONFIG_FILE).write_text(json.dumps(config, indent=2))
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)


def read_adapter(folder: str) -> tuple[lora.Spec, str]:
  """(spec, base HF folder) of a PEFT LoRA adapter folder; ValueError (one line) when it is not one we can continue,
  or its base is not a local HF folder."""
  path = epath.Path(folder) / CONFIG_FILE
  if not path.exists() or not (epath.Path(folder) / WEIGHTS_FILE).exists():
    raise ValueError(f"init_from=peft:{folder}: not a PEFT adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
  c = json.loads(path.read_text())
  unsupported = {k: c.get(k) for k in ("use_rslora", "use_dora") if c.get(k)}
  if c.get("peft_type") != "LORA" or unsupported or c.get("modules_to_save"):
    raise ValueError(f"init_from=peft:{folder}: only plain LoRA adapters continue (peft_type={c.get('peft_type')!r}"
                     f", {unsupported or ''} modules_to_save={c.get('modules_to_save')!r})")
  base = c.get("base_model_name_or_path") or ""
  if not (epath.Path(base) / "config.json").exists():
    raise ValueError(f"init_from=peft:{folder}: its base_model_name_or_path {base!r} is not a local Hugging Face "
                     f"folder (with config.json): download the base and set base_model_name_or_path in {path}")
  with safetensors.safe_open(str(epath.Path(folder) / WEIGHTS_FILE), "numpy") as f:
    modules = sorted({m.group(1) for k in f.keys() if (m := re.match(r"base_model\.model\.model\.(.*)\.lora_A", k))})
  targets = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
  return lora.Spec(int(c["r"]), float(c["lora_alpha"]), targets), base


def load_adapter(folder: str, model: nnx.Module, mesh: Mesh) -> None:
  """Set the adapters of `model` (adapted by `read_adapter`'s spec) to a PEFT folder's tensors, placed on `mesh`, in
  place; ValueError (one line) when a tensor's shape is not the model's (an adapter of another base or family)."""
  cfg = model.cfg
  state = nnx.state(model, nnx.LoRAParam)
  pure = jax.tree.map(lambda x: np.array(sharding.to_host(x)), nnx.to_pure_dict(state))
  with safetensors.safe_open(os.path.join(folder, WEIGHTS_FILE), "numpy") as f:
    for i in range(cfg.num_layers):
      slot, row = layer_slot(cfg, i)
      name, index = slot.split(".")
      sub = pure.get(name, {}).get(int(index), {})
      for owner, weight, hf, _ in lora.PROJECTIONS:
        for suffix, ab in ((lora.A_SUFFIX, "A"), (lora.B_SUFFIX, "B")):
          ours = sub.get(owner, {}).get(weight + suffix)
          if ours is None:
            continue
          view = ours if row is None else ours[row]
          t = f.get_tensor(KEY.format(i=i, name=hf, ab=ab)).T  # ours flattened: A [in, r], B [r, out]
          if t.shape != (view.reshape(-1, view.shape[-1]) if ab == "A" else view.reshape(view.shape[0], -1)).shape:
            raise ValueError(f"init_from=peft:{folder}: layers.{i}.{hf}.lora_{ab} has shape {t.T.shape}, which "
                             f"does not fit this {cfg.family} model (embed_dim {cfg.embed_dim}): an adapter of "
                             "another base")
          view[...] = t.reshape(view.shape)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))


# ------------------------------------------------------------------------------------------------ a run's base
def fingerprint(base: nnx.State) -> list[float]:
  """(sum |w|, sum w²) over every base weight, in float32: equal bases agree to ~1e-6, different ones do not."""
  @jax.jit
  def sums(tree):
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    return sum(jnp.abs(x).sum() for x in leaves), sum(jnp.square(x).sum() for x in leaves)
  return [float(v) for v in sums(base)]


def save_base(workdir: str, record: dict) -> None:
  folder = epath.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / BASE_FILE).write_text(json.dumps(record, indent=1))


def read_base(workdir: str) -> dict | None:
  """The base record of a LoRA run's workdir; None for a full fine-tuning run."""
  path = epath.Path(workdir) / BASE_FILE
  return json.loads(path.read_text()) if path.exists() else None


def same_base(a: dict, b: dict) -> bool:
  return all(math.isclose(x, y, rel_tol=1e-3) for x, y in zip(a["fingerprint"], b["fingerprint"]))
