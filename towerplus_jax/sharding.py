"""Device mesh, logical-axis rules and the shardings derived from them.

Parameters carry logical axis names (`axes` metadata, e.g. ("embed", "mlp")); `RULES` map each logical name to mesh
axes. A mesh axis that does not divide a dimension is dropped for that dimension (it stays replicated there), so a
model with 2 kv heads still runs on tensor=4.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes the batch is split over
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

RULES: Rules = (
    ("batch", BATCH),
    ("layers", None),  # the stacked axis of scanned layers: every device holds all layers' rows of its shard
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve one -1 ("the rest") in {"data": ..., "fsdp": ..., "tensor": ...}."""
  unknown = [a for a in MESH_AXES if sizes.get(a, 1) == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
  known = math.prod(sizes.get(a, 1) for a in MESH_AXES if a not in unknown)
  if num_devices % known:
    raise ValueError(f"mesh {sizes} does not divide {num_devices} devices")
  shape = tuple(num_devices // known if a in unknown else sizes.get(a, 1) for a in MESH_AXES)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} of {num_devices} devices")
  return shape


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types, e.g. make_mesh({"fsdp": -1})."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh, rules: Rules = RULES) -> P:
  """PartitionSpec for an array with these logical axes; keeps only mesh axes that are unused and divide the dim."""
  table, used, spec = dict(rules), set(), []
  for name, dim in zip(axes, shape):
    targets = table.get(name) if name is not None else None
    targets = (targets,) if isinstance(targets, str) else tuple(targets or ())
    kept = []
    for axis in targets:
      size = mesh.shape[axis]
      if axis not in used and size > 1 and dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = RULES) -> jax.Array:
  """Sharding constraint by logical axes on the current mesh (`jax.set_mesh`); a no-op without one (or on a mesh
  without our axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = RULES) -> nnx.State:
  """`state` (abstract or concrete) with each Variable's value replaced by its NamedSharding (from `axes`);
  the tree keeps the structure of `state`, as jit shardings and optax.tree_map_params need."""
  def one(var):
    axes = var.get_metadata().get("axes") or (None,) * var.ndim
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=_is_var)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = RULES) -> nnx.Module:
  """Build a model directly onto the mesh: init runs under jit with out_shardings, never whole on one device."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  shardings = state_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def batch_spec(ndim: int, mesh: Mesh, batch_size: int | None = None) -> P:
  """Batch dimension split over the data axes that divide it; the other dimensions replicated."""
  axes = [a for a in BATCH if mesh.shape[a] > 1]
  if batch_size is not None:
    while axes and batch_size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
  lead = tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)
  return P(lead, *([None] * (ndim - 1)))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split over the batch axes (multi-host safe)."""
  def one(x):
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count() if x.ndim else None
    spec = batch_spec(x.ndim, mesh, global_b) if x.ndim else P()
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  return {k: one(v) for k, v in batch.items()}


def vocab_parallel_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mesh: Mesh | AbstractMesh) -> jax.Array:
  """log softmax(logits)[target] with the vocab split over "tensor": no device ever holds full-vocab logits.

  Each shard computes its local max / sum-exp and picks its own part of the target logit; one pmax and two psums
  over "tensor" combine them (the explicit collective `jax.shard_map` exists for).
  """
  b, _, v = logits_BTV.shape
  if v % mesh.shape["tensor"]:
    raise ValueError(f"vocab {v} is not divisible by tensor={mesh.shape['tensor']}")
  bspec = batch_spec(2, mesh, b)[0]

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(bspec, None, "tensor"), P(bspec, None)),
                     out_specs=P(bspec, None), check_vma=False)
  def local(logits, targets):
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    offset = jax.lax.axis_index("tensor") * v_local
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), "tensor")
    lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), "tensor"))
    idx = targets - offset
    inside = (idx >= 0) & (idx < v_local)
    picked = jnp.take_along_axis(logits, jnp.clip(idx, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    return jax.lax.psum(jnp.where(inside, picked, 0.0), "tensor") - lse

  return local(logits_BTV, targets_BT)
