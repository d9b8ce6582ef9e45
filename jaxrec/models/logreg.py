"""Logistic regression over the same features: the no-interaction baseline.

logit_t = b_t + sum_f w_{f, id_f, t} + dense . v_t. It learns one weight per id and per dense
feature, so it cannot represent any user x ad interaction. The per-id weights live in a fused
table of width T, trained by the same sparse optimizer as the ranker's embeddings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.data.batch import Batch, Schema
from jaxrec.layers import FusedEmbedding, pool, table_configs


@dataclasses.dataclass(frozen=True)
class LogRegConfig:
  hash_rows: int = 1 << 17
  """rows per feature for raw-hash features"""
  max_rows_per_feature: int = 1 << 20
  """vocabularies up to this size get one row per id"""


class LogisticRegression(nnx.Module):

  def __init__(self, schema: Schema, cfg: LogRegConfig, *, row_multiple: int = 1, rngs: nnx.Rngs):
    t = schema.num_tasks
    self.combiner = "sum"
    self.embedding = FusedEmbedding(
        table_configs(schema.sparse, dim=t, hash_rows=cfg.hash_rows,
                      max_rows_per_feature=cfg.max_rows_per_feature),
        row_multiple=row_multiple, init_scale=1e-3, rngs=rngs)
    self.linear = nnx.Linear(max(schema.num_dense, 1), t, use_bias=True, dtype=jnp.float32,
                             param_dtype=jnp.float32, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.has_dense = schema.num_dense > 0

  def from_pooled(self, dense: jax.Array, pooled: jax.Array) -> jax.Array:
    """Logits f32 [B, T] from dense [B, Fd] and pooled per-id weights [B, Fs, T]."""
    x = dense if self.has_dense else jnp.zeros((pooled.shape[0], 1), jnp.float32)
    return self.linear(x.astype(jnp.float32)) + jnp.sum(pooled.astype(jnp.float32), axis=1)

  def __call__(self, batch: Batch) -> jax.Array:
    rows = self.embedding.gather(self.embedding.table[...], self.embedding.row_ids(batch.sparse))
    return self.from_pooled(batch.dense, pool(rows, batch.sparse_mask, self.combiner))
