"""The training state: what a train step reads and updates, and what a checkpoint holds.

`params` are the trainable parameters (every `nnx.Param` for full fine-tuning, the adapters' `nnx.LoRAParam`s under
LoRA); `frozen` the rest of the model, read by every step and never updated (empty for full fine-tuning; the base
weights under LoRA adapters); `reference` a frozen copy of `params` as the stage started, which with `frozen` is the
reference policy a preference or KL loss compares against (under LoRA a copy of the adapters only: fresh adapters
give exactly the base, a continued adapter the previous stage's policy), or None. Only `params` have optimizer state and gradients. The policy is `policy(graphdef, params, frozen)`: the model,
whose layers apply its LoRA adapters (if any) next to the frozen base weights (models/lora.py).

`abstract` gives the same state as sharded shapes (for the TPU compiler, nothing allocated), `init` the real one
placed on the mesh; both lay every leaf out as `shardings` says.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from towerplus_jax import sharding

Filter = Any  # an nnx filter: a Variable type, a path predicate, ...


def policy(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State) -> nnx.Module:
  """The model of `params` and `frozen` (its layers apply the LoRA adapters, if any)."""
  return nnx.merge(graphdef, params, frozen)


@struct.dataclass
class TrainState:
  params: nnx.State  # trainable parameters
  opt_state: optax.OptState  # the optimizer's state of `params`
  step: jax.Array  # int32[]: optimizer steps taken
  rng: jax.Array  # uint32[2]: key data of the run's RNG (folded with the step in each step)
  frozen: nnx.State  # model variables the step reads but never updates
  reference: nnx.State | None = None  # frozen copy of the stage's initial params (the reference policy), or None

  def model(self, graphdef: nnx.GraphDef) -> nnx.Module:
    """The current policy."""
    return policy(graphdef, self.params, self.frozen)

  def reference_model(self, graphdef: nnx.GraphDef) -> nnx.Module:
    return policy(graphdef, self.reference, self.frozen)

  def checkpoint_items(self) -> tuple[dict, dict]:
    """(params as a pure dict, {"opt_state", "step", "rng"}): what a checkpoint saves of the state."""
    return nnx.to_pure_dict(self.params), {"opt_state": self.opt_state, "step": self.step, "rng": self.rng}

  def with_checkpoint(self, params: dict, train: dict) -> TrainState:
    """This state with a checkpoint's `checkpoint_items` put back."""
    nnx.replace_by_pure_dict(self.params, params)
    return self.replace(params=self.params, **train)


def opt_shardings(tx: optax.GradientTransformation, params: nnx.State, params_sh: Any, replicated: NamedSharding):
  """Optimizer-state leaves that mirror a parameter get its sharding; the rest (counts, scalars) are replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract, params_sh, transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def _key_data(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def shardings(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
              reference: bool) -> TrainState:
  """Where each leaf of the state lives: parameters by their logical axes, optimizer state as its parameter,
  step and RNG replicated."""
  replicated = NamedSharding(mesh, P())
  params_sh = sharding.state_shardings(params, mesh)
  frozen_sh = sharding.state_shardings(frozen, mesh)
  ref_sh = params_sh if reference else None
  return TrainState(params_sh, opt_shardings(tx, params, params_sh, replicated), replicated,
                    jax.tree.map(lambda _: replicated, jax.eval_shape(lambda: _key_data(0))), frozen_sh, ref_sh)


def _with(tree: Any, shardings_: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings_)


def abstract(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *, reference: bool = False,
             trainable: Filter = nnx.Param) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, the state as sharded `jax.ShapeDtypeStruct`s) of an abstract model (`nnx.eval_shape`)."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  sh = shardings(params, frozen, tx, mesh, reference)
  shapes = TrainState(params, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32),
                      jax.eval_shape(lambda: _key_data(0)), frozen,
                      params if reference else None)
  return graphdef, _with(shapes, sh)


def init(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, seed: int, *,
         reference: nnx.State | None = None, trainable: Filter = nnx.Param) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, the state at step 0) of a model already placed on `mesh`; the optimizer state is created sharded."""
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  sh = shardings(params, frozen, tx, mesh, reference is not None)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
  return graphdef, TrainState(params, opt_state, jax.device_put(jnp.zeros((), jnp.int32), sh.step),
                              jax.device_put(_key_data(seed), sh.rng), frozen, reference)
