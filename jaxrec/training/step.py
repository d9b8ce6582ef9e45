"""The jitted training and eval steps.

    train_step(state, batch) -> (state, {"loss": f32 []})
    eval_step(state, batch) -> probabilities f32 [B, T]

There is no randomness in the step (no dropout), so it takes no rng. The embedding table is
updated by sparse row-wise Adagrad from the gradient with respect to the looked-up rows; the
dense parameters by optax (Adam by default). State buffers are donated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxrec.data.batch import Batch
from jaxrec.layers import pool
from jaxrec.training import sharding
from jaxrec.training.losses import weighted_bce
from jaxrec.training.sparse_adagrad import sparse_rowwise_adagrad
from jaxrec.training.state import TrainState, merge_model, merge_state


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  dense_lr: float = 2e-3
  """Adam learning rate of the dense parameters"""
  embedding_lr: float = 0.3
  """row-wise Adagrad learning rate of the embedding table; 0 freezes the table at its init (the
  step then takes no gradient for it). Frappe with counting features trains best frozen: learned id
  embeddings there only memorise training pairs (docs/BENCHMARKS.md)"""
  embedding_l2: float = 0.0
  """L2 penalty on looked-up embedding rows: adds embedding_l2 * row to each lookup's gradient
  (the batch-level embedding regularizer of FuxiCTR/BARS; rows seen more often are pulled harder)"""
  weight_decay: float = 0.0
  """decoupled weight decay of the dense parameters (AdamW); 0 = plain Adam"""
  warmup_steps: int = 0
  """linear warm-up of the dense learning rate over this many steps"""
  adam_b1: float = 0.9
  """Adam's first-moment decay, in [0, 1)"""
  adam_b2: float = 0.999
  """Adam's second-moment decay, in [0, 1)"""
  adagrad_eps: float = 1e-8
  """epsilon of the row-wise Adagrad denominator (> 0)"""

  def __post_init__(self):
    if not (math.isfinite(self.dense_lr) and math.isfinite(self.embedding_lr)):
      raise ValueError(f"optim.dense_lr and optim.embedding_lr must be finite, got dense_lr={self.dense_lr}, "
                       f"embedding_lr={self.embedding_lr}")
    if self.dense_lr <= 0 or self.embedding_lr < 0:
      raise ValueError(f"optim.dense_lr must be > 0 and optim.embedding_lr >= 0 (0 freezes the embedding "
                       f"table), got dense_lr={self.dense_lr}, embedding_lr={self.embedding_lr}")
    if self.embedding_l2 < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
      raise ValueError("optim.embedding_l2, weight_decay and warmup_steps must be >= 0")
    if not (0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1 and self.adagrad_eps > 0):
      raise ValueError(f"need optim.adam_b1 and optim.adam_b2 in [0, 1) and optim.adagrad_eps > 0, got "
                       f"{self.adam_b1}, {self.adam_b2} and {self.adagrad_eps}")


def dense_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  lr = cfg.dense_lr if cfg.warmup_steps <= 0 else optax.linear_schedule(0.0, cfg.dense_lr, cfg.warmup_steps)
  if cfg.weight_decay > 0:
    return optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, weight_decay=cfg.weight_decay)
  return optax.adam(lr, b1=cfg.adam_b1, b2=cfg.adam_b2)


def batch_shardings(mesh: Mesh, with_truth: bool) -> Batch:
  rows = sharding.row_sharded(mesh)
  return Batch(dense=rows, sparse=rows, sparse_mask=rows, labels=rows, weights=rows, domain=rows,
               timestamp=rows, true_prob=rows if with_truth else None)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: OptimConfig,
                    state_sh: TrainState, batch_sh: Batch) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    model = merge_state(graphdef, state)
    row_ids = model.embedding.row_ids(batch.sparse)
    rows = model.embedding.gather(state.table, row_ids)
    combiner = model.combiner

    def loss_fn(params, fp8, rows):
      m = merge_model(graphdef, params, state.table, fp8)
      logits = m.from_pooled(batch.dense, pool(rows, batch.sparse_mask, combiner))
      return weighted_bce(logits, batch.labels, batch.weights)

    # the "gradient" of the fp8 amax histories is their updated value (jaxrec.ops.delayed_dense)
    if cfg.embedding_lr == 0:  # frozen table: no embedding gradient at all
      loss, (g_params, fp8) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state.params, state.fp8, rows)
    else:
      loss, (g_params, fp8, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(state.params, state.fp8, rows)
    updates, opt_state = tx.update(g_params, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if cfg.embedding_lr == 0:
      table, acc = state.table, state.table_acc
    else:
      live = batch.sparse_mask & (batch.weights > 0)[:, None, None]
      if cfg.embedding_l2 > 0:
        g_rows = g_rows + cfg.embedding_l2 * rows * live[..., None]
      table, acc = sparse_rowwise_adagrad(state.table, state.table_acc, row_ids, g_rows, live,
                                          lr=cfg.embedding_lr, eps=cfg.adagrad_eps)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, table=table, table_acc=acc, fp8=fp8)
    return new, {"loss": loss}

  rep = NamedSharding(state_sh.table.mesh, jax.sharding.PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, {"loss": rep}),
                 donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, state_sh: TrainState, batch_sh: Batch) -> Callable[[TrainState, Batch], jax.Array]:

  def eval_step(state: TrainState, batch: Batch) -> jax.Array:
    return jax.nn.sigmoid(merge_state(graphdef, state)(batch))

  rep = NamedSharding(state_sh.table.mesh, jax.sharding.PartitionSpec())
  return jax.jit(eval_step, in_shardings=(state_sh, batch_sh), out_shardings=rep)
