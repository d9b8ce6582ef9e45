"""TrainState: everything a training step reads and writes, as one donated pytree.

    step       i32 []        steps taken
    params     dict          dense parameters (nnx pure dict, everything but the embedding table)
    opt_state  optax state   Adam state of `params`
    table      f32 [R, D]    fused embedding table (row-sharded)
    table_acc  f32 [R]       row-wise Adagrad accumulator (row-sharded)

The model's structure (its nnx GraphDef) is static and lives outside the state; `merge_model`
rebuilds the module from (graphdef, params, table) inside jitted code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxrec.training import sharding


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  table: jax.Array
  table_acc: jax.Array


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, jax.Array]:
  """(graphdef, dense params as a pure dict, embedding table)."""
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  emb = dict(pure.pop("embedding"))
  table = emb.pop("table")
  if emb:
    raise ValueError(f"the embedding module holds more than its table: {sorted(emb)}")
  return graphdef, pure, table


def merge_model(graphdef: nnx.GraphDef, params: dict, table: jax.Array) -> nnx.Module:
  return nnx.merge(graphdef, nnx.State({**params, "embedding": {"table": table}}))


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
  rep, rows = sharding.replicated(mesh), sharding.row_sharded(mesh)
  return TrainState(
      step=rep,
      params=jax.tree.map(lambda _: rep, abstract.params),
      opt_state=jax.tree.map(lambda _: rep, abstract.opt_state),
      table=rows,
      table_acc=rows,
  )


def plan_train_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                     mesh: Mesh) -> tuple[nnx.GraphDef, Callable[[], TrainState], TrainState, TrainState]:
  """Everything about the state except its values, allocating nothing.

  Returns (graphdef, init, abstract state, shardings): `init()` builds the model directly into
  its shardings (no host copy of the table); a run that restores a checkpoint skips it and
  restores into (abstract, shardings) instead.
  """
  graphdef = nnx.split(nnx.eval_shape(model_fn))[0]

  def init() -> TrainState:
    _, params, table = split_model(model_fn())
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      table=table, table_acc=jnp.zeros(table.shape[:1], jnp.float32))

  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, mesh)
  return graphdef, jax.jit(init, out_shardings=shardings), abstract, shardings


def create_train_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """A freshly initialised state: (graphdef, state, shardings of the state)."""
  graphdef, init, _, shardings = plan_train_state(model_fn, tx, mesh)
  return graphdef, init(), shardings
