"""Device mesh, logical-axis rules and the shardings derived from them.

Parameters carry logical axis names (`axes` metadata, e.g. ("embed", "mlp")); `LOGICAL_AXIS_RULES` map each logical
name to mesh axes. A mesh axis that does not divide a dimension is dropped for that dimension (it stays replicated
there), so a model with 2 kv heads still runs on tensor=4.

Multislice (`mesh.slices` > 1): the data axis spans the slices (data parallel over DCN), fsdp and tensor stay inside
a slice (ICI); the other sizes describe one slice.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes the batch is split over
AxisRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: AxisRules = (
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
    raise ValueError(f"mesh {({a: sizes.get(a, 1) for a in MESH_AXES})} does not divide {num_devices} devices")
  shape = tuple(num_devices // known if a in unknown else sizes.get(a, 1) for a in MESH_AXES)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} of {num_devices} devices")
  return shape


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices the devices span (1 for CPU/GPU devices, which have no `slice_index`)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types, e.g. make_mesh({"fsdp": -1}).

  `sizes["slices"]` (default 1) must be the number of slices the devices span; with S > 1 the axis sizes describe one
  slice and the data axis is S times `sizes["data"]`, ordered by jax's hybrid-mesh helper so that only the data
  axis crosses slices."""
  devices = list(devices if devices is not None else jax.devices())
  slices, found = sizes.get("slices", 1), num_slices(devices)
  if slices != found:
    raise ValueError(f"config.mesh.slices={slices} but the {len(devices)} devices form {found} slice(s): set "
                     f"config.mesh.slices={found}")
  shape = mesh_shape(sizes, len(devices) // slices)
  types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  dcn = (slices,) + (1,) * (len(MESH_AXES) - 1)
  return Mesh(mesh_utils.create_hybrid_device_mesh(shape, dcn, devices), MESH_AXES, axis_types=types)


def platform() -> str:
  """The platform ('cpu' | 'gpu' | 'tpu') of the devices of the mesh being traced under (`jax.set_mesh`), else JAX's
  default backend: kernels follow the devices a program is compiled for (TPU devices on a CPU host for `aot`)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh,
                    rules: AxisRules = LOGICAL_AXIS_RULES) -> P:
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


def constrain(x: jax.Array, axes: Sequence[str | None], rules: AxisRules = LOGICAL_AXIS_RULES) -> jax.Array:
  """Sharding constraint by logical axes on the current mesh (`jax.set_mesh`); a no-op without one (or on a mesh
  without our axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: AxisRules = LOGICAL_AXIS_RULES) -> nnx.State:
  """`state` (abstract or concrete) with each Variable's value replaced by its NamedSharding (from `axes`);
  the tree keeps the structure of `state`, as jit shardings and optax.tree_map_params need."""
  def one(var):
    axes = var.get_metadata().get("axes") or (None,) * var.ndim
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=_is_var)


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh,
                   rules: AxisRules = LOGICAL_AXIS_RULES) -> nnx.Module:
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


def _check_rows_per_process(sharding: NamedSharding, global_b: int) -> None:
  """Host-local rows are only meaningful when no two processes hold the same global row (else one 'replicated'
  array would hold different rows on different hosts): raise instead of corrupting silently."""
  owner: dict[tuple, int] = {}
  for device, index in sharding.devices_indices_map((global_b,)).items():
    rows = index[0].indices(global_b)
    if owner.setdefault(rows, device.process_index) != device.process_index:
      axes = {a: sharding.mesh.shape[a] for a in BATCH}
      raise ValueError(f"a global batch of {global_b} rows cannot be split over the batch axes {axes} across "
                       f"{jax.process_count()} processes: make it a multiple of {math.prod(axes.values())}")


def shard_local_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split over the batch axes (multi-host safe: raises when the hosts'
  rows cannot be told apart)."""
  def one(x):
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count() if x.ndim else None
    spec = batch_spec(x.ndim, mesh, global_b) if x.ndim else P()
    if x.ndim and jax.process_count() > 1:
      _check_rows_per_process(NamedSharding(mesh, spec), global_b)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  return {k: one(v) for k, v in batch.items()}


def process_rows(mesh: Mesh, global_b: int) -> np.ndarray:
  """Indices of the global batch rows this process's devices hold under `batch_spec` (ascending): the order in
  which `shard_local_batch` maps host-local rows and `global_array_to_host_local_array` returns them."""
  spec = NamedSharding(mesh, batch_spec(1, mesh, global_b))
  _check_rows_per_process(spec, global_b)
  rows = {i for index in spec.addressable_devices_indices_map((global_b,)).values()
          for i in range(*index[0].indices(global_b))}
  return np.asarray(sorted(rows), np.int64)


def gather_rows(rows_R: np.ndarray, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
  """The inverse of taking this host's `process_rows`: each host passes its rows (global indices `rows_R`, the same
  count on every host) of some arrays; every host gets the arrays of all rows in global order. Bit-exact for any
  dtype (sent as bytes: no float64 -> float32 round trip)."""
  arrays = [np.ascontiguousarray(x) for x in arrays]
  if jax.process_count() > 1:
    as_bytes = [x.reshape(len(rows_R), -1).view(np.uint8) for x in (np.asarray(rows_R, np.int64), *arrays)]
    gathered = multihost_utils.process_allgather(as_bytes, tiled=True)
    rows_R, *arrays = [np.asarray(g).view(x.dtype).reshape(-1, *x.shape[1:])
                       for g, x in zip(gathered, (np.asarray(rows_R, np.int64), *arrays))]
  out = [np.empty_like(x) for x in arrays]
  for dst, x in zip(out, arrays):
    dst[rows_R] = x
  return out


def shard_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The same global numpy batch on every host -> global arrays split over the batch axes; each host copies only
  the rows its devices hold (which rows those are follows from the sharding, whatever the device order). A batch
  not divisible by the batch axes is replicated, which is correct here since every host has all rows."""
  def one(x):
    x = np.asarray(x)
    spec = batch_spec(x.ndim, mesh, x.shape[0]) if x.ndim else P()
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, x.shape)
  return {k: one(v) for k, v in batch.items()}


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
  """The whole of `x` as numpy on every host (gathered across processes when no host holds all of it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
