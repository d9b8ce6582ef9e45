"""TrainState: everything a training step reads and writes, as one donated pytree.

    step       i32 []        steps taken
    params     dict          dense parameters (nnx pure dict, everything but the embedding table)
    opt_state  optax state   Adam state of `params`
    table      f32 [R, D]    fused embedding table (row-sharded)
    table_acc  f32 [R]       row-wise Adagrad accumulator (row-sharded)
    fp8        dict          amax histories of the model's fp8_delayed GEMM sites (FP8Meta, nnx pure
                             dict; {} when there are none): state the step overwrites, no optimizer

The model's structure (its nnx GraphDef) is static and lives outside the state; `merge_model`
rebuilds the module from (graphdef, params, table, fp8) inside jitted code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from jaxrec.layers.dense import FP8Meta
from jaxrec.training import sharding


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: Any
  table: jax.Array
  table_acc: jax.Array
  fp8: dict = struct.field(default_factory=dict)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, jax.Array, dict]:
  """(graphdef, dense params as a pure dict, embedding table, fp8 amax histories as a pure dict)."""
  graphdef, fp8_state, state = nnx.split(model, FP8Meta, ...)
  pure = nnx.to_pure_dict(state)
  emb = dict(pure.pop("embedding"))
  table = emb.pop("table")
  if emb:
    raise ValueError(f"the embedding module holds more than its table: {sorted(emb)}")
  return graphdef, pure, table, nnx.to_pure_dict(fp8_state)


def merge_model(graphdef: nnx.GraphDef, params: dict, table: jax.Array, fp8: dict | None = None) -> nnx.Module:
  """The module from its parts (`split_model`'s); fp8 may be left out for a model without
  fp8_delayed sites."""
  parts = [nnx.State({**params, "embedding": {"table": table}})]
  if fp8:
    parts.append(nnx.State(fp8))
  return nnx.merge(graphdef, *parts)


def merge_state(graphdef: nnx.GraphDef, state: "TrainState") -> nnx.Module:
  """The module a TrainState holds."""
  return merge_model(graphdef, state.params, state.table, state.fp8)


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
  rep, rows = sharding.replicated(mesh), sharding.row_sharded(mesh)
  return TrainState(
      step=rep,
      params=jax.tree.map(lambda _: rep, abstract.params),
      opt_state=jax.tree.map(lambda _: rep, abstract.opt_state),
      table=rows,
      table_acc=rows,
      fp8=jax.tree.map(lambda _: rep, abstract.fp8),
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
    _, params, table, fp8 = split_model(model_fn())
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      table=table, table_acc=jnp.zeros(table.shape[:1], jnp.float32), fp8=fp8)

  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, mesh)
  return graphdef, jax.jit(init, out_shardings=shardings), abstract, shardings


def table_rows_used(model_fn: Callable[[], nnx.Module]) -> int:
  """The rows of the model's embedding table that its features own (the rest pad it to a row
  multiple; `Checkpointer.restore` takes this to restore a run trained on another device count)."""
  return nnx.eval_shape(model_fn).embedding.used_rows


def create_train_state(model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                       mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """A freshly initialised state: (graphdef, state, shardings of the state)."""
  graphdef, init, _, shardings = plan_train_state(model_fn, tx, mesh)
  return graphdef, init(), shardings
