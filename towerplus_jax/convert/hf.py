"""Hugging Face folders (safetensors + config.json) <-> towerplus_jax: streaming import onto a mesh, sharded export
and the CLI. Key tables: hf_tables.py; config.json translation: hf_config.py; tokenizer files: data/tokenizer_files.py.

    python -m towerplus_jax.convert.hf import --hf=HF_DIR --out=DIR       # DIR is a run workdir: init_from=ckpt:DIR
    python -m towerplus_jax.convert.hf export --workdir=DIR [--step=N] --out=HF_DIR [--adapter]

A LoRA run (its workdir has convert/peft.py's lora_base.json) exports merged full weights (its base, rebuilt from the
record, plus the merged adapters), or with --adapter a PEFT adapter folder; `run_model` gives the same merged weights
to a stage whose init_from is such a run (the chain's next stage).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, Sharding
from safetensors import SafetensorError, safe_open

from towerplus_jax import errors, sharding
from towerplus_jax.convert import peft
from towerplus_jax.convert.hf_config import config_from_folder, config_to_hf, default_token_ids, read_json
from towerplus_jax.convert.hf_tables import IGNORABLE, Layout, key_map
from towerplus_jax.convert.tokenizer_files import (
  MODEL_FILES,
  TOKENIZER_FILES,
  chat_token_ids,
  copy_tokenizer_files,
  template_in,
  tokenizer_in,
  write_tokenizer_config,
)
from towerplus_jax.data import chat
from towerplus_jax.files import checkpoint, storage
from towerplus_jax.models import config as model_config
from towerplus_jax.models import layout, lora
from towerplus_jax.models.config import ModelConfig
from towerplus_jax.models.transformer import Transformer, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------ import
def named_leaves(tree: Mapping) -> dict[str, tuple[tuple, Any]]:
  """{"layers.0.attn.q_DNH": (key path, leaf)} of a nested pure dict (layer indices are int keys)."""
  return {".".join(map(str, path)): (path, leaf) for path, leaf in traverse_util.flatten_dict(tree).items()}


def _weight_map(hf_dir: str) -> dict[str, str]:
  """HF tensor name -> safetensors file path, from the shard index or the single file."""
  index = os.path.join(hf_dir, INDEX_FILE)
  if os.path.exists(index):
    return {k: os.path.join(hf_dir, v) for k, v in read_json(index)["weight_map"].items()}
  single = os.path.join(hf_dir, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  with _safe_open(single, "numpy") as f:
    return {k: single for k in f.keys()}


def _safe_open(path: str, framework: str):
  """safetensors' safe_open, a damaged file (truncated, not safetensors) as one ValueError naming it."""
  try:
    return safe_open(path, framework=framework)
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({str(e).strip().splitlines()[0]}); the download is "
                     "incomplete or the file damaged: fetch it again") from None


def _prefixes(weight_map: dict[str, str]) -> dict[str, str]:
  """Where the files keep our table's text-only names (Gemma 3 multimodal: `model.language_model.` etc.)."""
  for model, head in (("model.language_model.", "lm_head."), ("language_model.model.", "language_model.lm_head.")):
    if model + "embed_tokens.weight" in weight_map:
      return {"model.": model, "lm_head.": head}
  return {"model.": "model.", "lm_head.": "lm_head."}


def _stored_name(name: str, prefixes: dict[str, str]) -> str:
  for ours, theirs in prefixes.items():
    if name.startswith(ours):
      return theirs + name[len(ours):]
  return name


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one of our parameters comes from: its HF tensors (one per stacked row, else one) and their files."""

  names: tuple[str, ...]
  files: tuple[str, ...]
  layout: Layout
  stacked: bool  # one HF tensor per row of our leading (layers) axis
  shape: tuple[int, ...]  # our shape of one row (stacked) or of the whole parameter
  # Tensors read so far (our layout), so that the per-device reads of one parameter read each file once;
  # `_place` empties it when the parameter is placed.
  cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def _tensor(self, k: int) -> np.ndarray:
    if k not in self.cache:
      # framework "flax" reads bfloat16 (numpy cannot); on the host, never through an accelerator
      with _safe_open(self.files[k], "flax") as f, jax.default_device(_host_device()):
        x = np.asarray(f.get_tensor(self.names[k]))
      if not np.isfinite(x).all():
        raise ValueError(f"{self.files[k]}: tensor {self.names[k]} holds {np.size(x) - np.isfinite(x).sum()} "
                         "NaN/Inf values; the checkpoint is corrupt")
      self.cache[k] = self.layout.to_ours(x, self.shape)
    return self.cache[k]

  def read(self, index: tuple[slice, ...] = ()) -> np.ndarray:
    """The parameter (or the `index` part of it) in our layout; a stacked one reads only the rows it needs."""
    if not self.stacked:
      return self._tensor(0)[index]
    rows = range(len(self.names))[index[0] if index else slice(None)]
    return np.stack([self._tensor(k)[index[1:]] for k in rows])


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                       "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool"}


def _shape_and_dtype(file: str, name: str, hf_dir: str) -> tuple[tuple[int, ...], str]:
  """Shape and dtype of tensor `name` in `file`, or one error naming the file the index sent us to."""
  if not os.path.exists(file):
    raise FileNotFoundError(f"{hf_dir}: {INDEX_FILE} lists {os.path.basename(file)} (for {name}), which is missing")
  with _safe_open(file, "numpy") as f:
    if name not in f.keys():
      raise ValueError(f"{hf_dir}: {INDEX_FILE} maps {name} to {os.path.basename(file)}, which does not hold it "
                       "(the shard index does not match the shards)")
    info = f.get_slice(name)
    dtype = info.get_dtype()
    return tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype.lower())


def hf_sources(hf_dir: str, cfg: ModelConfig, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, _Source]:
  """Our path -> its `_Source`, after checking names (missing / unexpected) and shapes against `targets`."""
  weight_map = _weight_map(hf_dir)
  prefixes = _prefixes(weight_map)
  table = {_stored_name(hf, prefixes): entry for hf, entry in key_map(cfg, set(targets)).items()}
  missing = sorted(n for n in table if n not in weight_map)
  if missing:
    files = sorted({os.path.basename(f) for f in weight_map.values()})
    raise ValueError(f"{hf_dir}: missing tensor(s) {missing} (a {cfg.family} model needs them; files: {files})")
  ignorable = (prefixes["lm_head."] + "weight",) if cfg.tie_embeddings else ()
  extra = sorted(n for n in weight_map if n not in table and n not in ignorable and not IGNORABLE.search(n))
  if extra:
    raise ValueError(f"{hf_dir}: unexpected tensor(s) {extra} for a {cfg.family} model")
  by_path: dict[str, list[tuple[int, str]]] = {}
  for name, (path, row, _) in table.items():
    by_path.setdefault(path, []).append((row or 0, name))
  sources = {}
  for path, rows in by_path.items():
    names = tuple(name for _, name in sorted(rows))
    _, row, layout = table[names[0]]
    shape = targets[path].shape[1:] if row is not None else targets[path].shape
    for name in names:
      want, found, dtype = layout.hf_shape(shape), *_shape_and_dtype(weight_map[name], name, hf_dir)
      if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(f"{weight_map[name]}: tensor {name} is {dtype}, not floating-point weights")
      if want != found:
        raise ValueError(f"{weight_map[name]}: tensor {name} has shape {found}, expected {want} ({path} {shape})")
    sources[path] = _Source(names, tuple(weight_map[n] for n in names), layout, row is not None, tuple(shape))
  return sources


def _host_device() -> jax.Device | None:
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out: read onto the default device
    return None


def _place(source: _Source, target: jax.ShapeDtypeStruct, target_sharding: Sharding | None) -> jax.Array:
  """One parameter onto its sharding (else the default device), each device reading only its part."""
  try:
    if target_sharding is None:
      return jnp.asarray(source.read().astype(target.dtype))
    return jax.make_array_from_callback(target.shape, target_sharding,
                                        lambda index: source.read(index).astype(target.dtype))
  finally:
    source.cache.clear()


def load_hf(hf_dir: str, *, mesh: Mesh | None = None, rules: sharding.AxisRules = sharding.LOGICAL_AXIS_RULES,
            overrides: Mapping[str, Any] | None = None) -> tuple[ModelConfig, Transformer]:
  """(ModelConfig, model) from an HF folder. The model is built abstractly and filled parameter by parameter, each
  placed straight onto its sharding on `mesh` (else the default device). `overrides`: ModelConfig fields such as
  dtype, param_dtype, remat, scan_layers."""
  cfg = config_from_folder(hf_dir).replace(**(overrides or {}))
  graphdef, abstract = nnx.split(abstract_model(cfg))
  flat = named_leaves(nnx.to_pure_dict(abstract))
  shardings = named_leaves(nnx.to_pure_dict(sharding.state_shardings(abstract, mesh, rules))) if mesh else {}
  targets = {name: leaf for name, (_, leaf) in flat.items()}
  params = {flat[name][0]: _place(source, targets[name], shardings[name][1] if mesh else None)
            for name, source in hf_sources(hf_dir, cfg, targets).items()}
  nnx.replace_by_pure_dict(abstract, traverse_util.unflatten_dict(params))
  return cfg, nnx.merge(graphdef, abstract)


# ------------------------------------------------------------------------------------------------ export
def parse_size(size: str | int) -> int:
  """"5GB" -> 5e9 bytes, "2GiB" -> 2 * 2**30, "300KB", or a plain number of bytes."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
  if not m:
    raise ValueError(f"max_shard_size={size!r}: use e.g. '5GB', '500MB', '2GiB' or a number of bytes")
  base = 1024 if m.group(3) else 1000
  return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
  """Consecutive tensors grouped so that no group passes `limit` bytes (a bigger tensor gets its own group)."""
  groups, total = [[]], 0
  for name, size in sizes:
    if groups[-1] and total + size > limit:
      groups.append([])
      total = 0
    groups[-1].append(name)
    total += size
  return groups


def _pure_params(params: nnx.Module | nnx.State | Mapping) -> Mapping:
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


def _export_file(name: str) -> bool:
  """Whether `name` is a file an HF export writes (and so one `overwrite` may replace)."""
  return (name in TOKENIZER_FILES or name in ("config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE,
                                              peft.CONFIG_FILE, peft.WEIGHTS_FILE)
          or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None)


def check_export_target(out_dir: str, overwrite: bool) -> None:
  """Refuse a non-empty `out_dir` unless `overwrite`, and even then unless it holds only an earlier export's files
  (a run workdir, checkpoints or anything else is never deleted)."""
  out = epath.Path(out_dir)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out={out_dir} is a file, not a folder")
  names = [p.name for p in out.iterdir()] if out.exists() else []
  if not names:
    return
  foreign = sorted(n for n in names if not _export_file(n))
  if foreign:
    raise FileExistsError(f"--out={out_dir} holds {foreign[:5]}, which an export did not write; choose an empty or "
                          "new folder (nothing was changed)")
  if not overwrite:
    raise FileExistsError(f"--out={out_dir} already holds an export; pass --overwrite to replace it, or choose "
                          "another folder (nothing was changed)")


def save_hf(params: nnx.Module | nnx.State | Mapping, cfg: ModelConfig, out_dir: str, *, dtype: str = "bfloat16",
            max_shard_size: str | int = "5GB", tokenizer_dir: str | None = None,
            generation_config: Mapping[str, Any] | None = None, overwrite: bool = False) -> None:
  """Write an HF folder (config.json, safetensors shards + index, generation_config.json, tokenizer files).

  `params`: a model, its nnx.State or the pure dict. Tensors are gathered to the host one at a time; only process 0
  writes, into `out_dir.tmp`, renamed to `out_dir` at the end. A non-empty `out_dir` is refused unless `overwrite`
  and it holds only an earlier export (`check_export_target`). `generation_config` defaults to the family's
  bos/eos/pad ids; its ids also go into config.json.
  """
  leaves = {name: leaf for name, (_, leaf) in named_leaves(_pure_params(params)).items()}
  table = key_map(cfg, set(leaves))
  np_dtype = np.dtype(jnp.dtype(dtype))
  def hf_shape(path: str, row: int | None, layout: Layout) -> tuple[int, ...]:
    return layout.hf_shape(leaves[path].shape[row is not None:])
  sizes = [(hf, math.prod(hf_shape(*entry)) * np_dtype.itemsize) for hf, entry in table.items()]
  groups = _shards(sizes, parse_size(max_shard_size))
  files = [SINGLE_FILE] if len(groups) == 1 else [
      f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
  writer = jax.process_index() == 0
  check_export_target(out_dir, overwrite)
  remote = not storage.is_local(out_dir)
  tmp = ""
  if writer:  # safetensors writes local files: a cloud export is staged on local disk and copied up at the end
    tmp = os.path.join(tempfile.mkdtemp(prefix="hf_export"), "out") if remote else out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  for file, names in zip(files, groups):
    tensors = {}
    for hf in names:
      path, row, layout = table[hf]
      leaf = leaves[path] if row is None else leaves[path][row]
      tensors[hf] = np.ascontiguousarray(layout.to_hf(sharding.to_host(leaf)).astype(np_dtype))
    if writer:
      safetensors.numpy.save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
  if writer:
    gen = dict(default_token_ids(cfg) if generation_config is None else generation_config)
    token_ids = {k: gen[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gen}
    _write_json(os.path.join(tmp, "config.json"), config_to_hf(cfg, dtype, token_ids))
    _write_json(os.path.join(tmp, "generation_config.json"), gen)
    if len(files) > 1:
      weight_map = {hf: file for file, names in zip(files, groups) for hf in names}
      _write_json(os.path.join(tmp, INDEX_FILE),
                  {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map})
    if tokenizer_dir:
      copy_tokenizer_files(tokenizer_dir, tmp)
    if remote:
      for stale in epath.Path(out_dir).glob("*") if epath.Path(out_dir).exists() else ():
        stale.unlink()  # an earlier export's files only (check_export_target)
      storage.mirror(tmp, out_dir)
      shutil.rmtree(os.path.dirname(tmp))
    else:
      shutil.rmtree(out_dir, ignore_errors=True)
      os.replace(tmp, out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("save_hf")


def _write_json(path: str | epath.Path, d: Mapping) -> None:
  epath.Path(path).write_text(json.dumps(d, indent=2))


# ------------------------------------------------------------------------------------------------ CLI
def import_to_workdir(hf_dir: str, out_dir: str, param_dtype: str = "float32") -> ModelConfig:
  """HF folder -> run-workdir layout: model_config.json, checkpoints/0/params (Orbax), tokenizer/. `out_dir` must be
  new or empty: an existing run is never overwritten."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"--out={out_dir} is not empty (it holds {sorted(os.listdir(out_dir))[:5]}); import into "
                          "a new folder (nothing was changed)")
  mesh = sharding.make_mesh({"fsdp": -1})
  cfg, model = load_hf(hf_dir, mesh=mesh, overrides={"param_dtype": param_dtype})
  checkpoint.save_params(os.path.join(out_dir, "checkpoints"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  if jax.process_index() == 0:
    model_config.save_json(cfg, out_dir)
    copy_tokenizer_files(hf_dir, os.path.join(out_dir, "tokenizer"))
  return cfg


def _restore(abstract: nnx.State, mesh: Mesh, workdir: str, step: int | None) -> dict:
  """The pure dict of `abstract`'s variables from a workdir's (latest or given) checkpoint, sharded on `mesh`."""
  target = checkpoint.abstract_like(nnx.to_pure_dict(abstract),
                                    nnx.to_pure_dict(sharding.state_shardings(abstract, mesh)))
  return checkpoint.restore_params(os.path.join(workdir, "checkpoints"), target, step)


def lora_base(record: dict, cfg: ModelConfig, mesh: Mesh) -> nnx.Module:
  """The base a LoRA run adapted, from its record (convert/peft.py): its init_from (an HF folder, a PEFT adapter's
  base or another run's workdir) or its seeded random init, in `cfg`'s layout and param dtype (not yet stored as the
  run's `lora.base_dtype`: models/lora.py `store_base`)."""
  kind, _, path = record["init_from"].partition(":")
  if kind == "peft":
    kind, path = "hf", peft.read_adapter(path)[1]
  if kind == "hf":
    _, model = load_hf(path, mesh=mesh, overrides={k: getattr(cfg, k) for k in model_config.RUNTIME_FIELDS})
  elif kind == "ckpt":
    model = run_model(path, cfg, mesh)
  else:
    model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(record["seed"])), mesh)
  return model


def run_model(workdir: str, cfg: ModelConfig, mesh: Mesh, step: int | None = None) -> nnx.Module:
  """A model of `cfg` (its layout and param dtype) with the weights of a run's (latest or given) checkpoint: its
  params, or for a LoRA run its base with its adapters merged in."""
  saved = model_config.load_json(workdir).replace(param_dtype=cfg.param_dtype)
  record = peft.read_base(workdir)
  if record is None:
    params = _restore(nnx.state(abstract_model(saved), nnx.Param), mesh, workdir, step)
  else:
    params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), lora_merged(workdir, record, saved, mesh, step))
  graphdef, state = nnx.split(abstract_model(cfg))
  nnx.replace_by_pure_dict(state, layout.convert(params, saved, cfg))
  return nnx.merge(graphdef, state)


def lora_adapters(workdir: str, record: dict, cfg: ModelConfig, mesh: Mesh, step: int | None
                  ) -> tuple[lora.Spec, dict]:
  """(spec, pure dict of the adapters) of a LoRA run's (latest or given) checkpoint."""
  spec = lora.Spec(record["rank"], record["alpha"], record["targets"])
  abstract = nnx.eval_shape(lambda: lora.apply(Transformer(cfg, rngs=nnx.Rngs(0)), spec, nnx.Rngs(0)))
  return spec, _restore(nnx.state(abstract, nnx.LoRAParam), mesh, workdir, step)


def lora_merged(workdir: str, record: dict, cfg: ModelConfig, mesh: Mesh, step: int | None = None) -> dict:
  """A LoRA run's merged params (base + alpha / rank · A B) as a pure dict in `cfg`'s layout, on `mesh`."""
  spec, adapters = lora_adapters(workdir, record, cfg, mesh, step)
  model = lora.apply(lora.store_base(lora_base(record, cfg, mesh), record["base_dtype"]), spec, nnx.Rngs(0))
  state = nnx.state(model, nnx.LoRAParam)
  nnx.replace_by_pure_dict(state, adapters)
  nnx.update(model, state)
  return nnx.to_pure_dict(nnx.state(lora.merged(model), lora.BASE))


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None, dtype: str = "bfloat16",
                   max_shard_size: str | int = "5GB", overwrite: bool = False, adapter: bool = False) -> None:
  """A run workdir's (latest or given) checkpoint -> HF folder, tokenizer taken from `<workdir>/tokenizer`. A LoRA
  run: merged full weights, or with `adapter` a PEFT adapter folder (refused for a full fine-tuning run)."""
  record = peft.read_base(workdir)
  if adapter and record is None:
    raise ValueError(f"--adapter: {workdir} is a full fine-tuning run (no {peft.BASE_FILE}), it has no adapters: "
                     "export it without --adapter (nothing was written)")
  check_export_target(out_dir, overwrite)  # before the (long) restore
  cfg = model_config.load_json(workdir)
  mesh = sharding.make_mesh({"fsdp": -1})
  if record is None:
    params = _restore(nnx.state(abstract_model(cfg), nnx.Param), mesh, workdir, step)
  else:
    if adapter:
      spec, adapters = lora_adapters(workdir, record, cfg, mesh, step)
      peft.save_adapter(adapters, cfg, spec, peft.base_name(record), out_dir)
      return
    params = lora_merged(workdir, record, cfg, mesh, step)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if not any((epath.Path(tokenizer_dir) / n).exists() for n in MODEL_FILES.values()):
    save_hf(params, cfg, out_dir, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    return
  tokenizer = tokenizer_in(tokenizer_dir)
  template = template_in(tokenizer_dir) or chat.family_template(cfg.family)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{tokenizer_dir} has {tokenizer.vocab_size} ids, the model {cfg.vocab_size}")
  save_hf(params, cfg, out_dir, dtype=dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
          generation_config=chat_token_ids(tokenizer, template), overwrite=overwrite)
  if jax.process_index() == 0:
    write_tokenizer_config(tokenizer, template, out_dir)


def cli(argv: list[str] | None = None) -> None:
  """`import` / `export` with their flags (`argv` without the program name)."""
  parser = argparse.ArgumentParser(prog="python -m towerplus_jax.convert.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF folder -> workdir with an Orbax params checkpoint")
  imp.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
  imp.add_argument("--out", required=True, help="output workdir")
  imp.add_argument("--param_dtype", default="float32")
  exp = sub.add_parser("export", help="workdir checkpoint -> HF folder")
  exp.add_argument("--workdir", "--ckpt", dest="workdir", required=True, help="run workdir (or `import` output)")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  exp.add_argument("--out", required=True, help="output HF folder")
  exp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="weights dtype of the export (default bfloat16, as the published checkpoints)")
  exp.add_argument("--max_shard_size", default="5GB")
  exp.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (only that)")
  exp.add_argument("--adapter", action="store_true", help="a LoRA run's PEFT adapter folder, not merged weights")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      import_to_workdir(args.hf, args.out, args.param_dtype)
    else:
      export_workdir(args.workdir, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, adapter=args.adapter)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    errors.fail(str(e))
  if args.command == "export" and args.adapter:
    print(f"exported the LoRA adapters of {args.workdir} to {args.out} (PEFT: peft.PeftModel.from_pretrained)")
  elif args.command == "export":
    print(f"exported {args.workdir} to {args.out} in {args.dtype} (--dtype=float32 keeps full precision); "
          "generation_config.json stops at the chat template's end-of-turn token")


if __name__ == "__main__":
  cli()
