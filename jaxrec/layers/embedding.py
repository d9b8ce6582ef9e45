"""Embedding tables for sparse features: TableConfig and a fused, row-shardable table.

All sparse features of a model share one fused table of shape [R, D] (R = the sum of the
features' row counts, rounded up to a multiple of `row_multiple` so the table row-shards evenly
over a mesh axis). Feature f owns rows [offset_f, offset_f + rows_f). An id is mapped to its row
either directly (vocabulary-encoded features whose vocabulary fits) or through a 32-bit integer
hash modulo rows_f (raw-hash features such as Criteo's categoricals, or vocabularies larger than
`max_rows_per_feature`).

The lookup is split from pooling so training can differentiate with respect to the looked-up rows
and apply a sparse optimizer update to the table (see `jaxrec.training.sparse_adagrad`):

    row_ids = emb.row_ids(sparse)             # i32 [B, Fs, L]
    rows = emb.gather(table, row_ids)         # [B, Fs, L, D]
    pooled = pool(rows, mask, "sum")          # [B, Fs, D]

>>> from jaxrec.data.batch import SparseFeature
>>> cfgs = table_configs((SparseFeature("user", 10), SparseFeature("q", None)), dim=4,
...                      hash_rows=8, max_rows_per_feature=100)
>>> [(c.name, c.num_rows, c.hashed) for c in cfgs]
[('user', 10, False), ('q', 8, True)]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrec.data.batch import SparseFeature

_HASH_MUL = np.uint32(0x9E3779B1)  # Knuth's multiplicative constant (golden ratio * 2^32)


@dataclasses.dataclass(frozen=True)
class TableConfig:
  """The rows one sparse feature owns in the fused table.

  name: the feature name. num_rows: rows for this feature. hashed: ids go through `hash_ids`
  before the modulo (else they are used directly and must be < num_rows). dim: embedding width.
  """

  name: str
  num_rows: int
  dim: int
  hashed: bool


def table_configs(features: tuple[SparseFeature, ...], *, dim: int, hash_rows: int,
                  max_rows_per_feature: int) -> tuple[TableConfig, ...]:
  """One TableConfig per feature: direct rows when the vocabulary is known and fits, else hashed."""
  out = []
  for f in features:
    if f.vocab_size is not None and f.vocab_size <= max_rows_per_feature:
      out.append(TableConfig(f.name, max(int(f.vocab_size), 1), dim, hashed=False))
    else:
      rows = hash_rows if f.vocab_size is None else min(hash_rows, int(f.vocab_size))
      out.append(TableConfig(f.name, rows, dim, hashed=True))
  return tuple(out)


def hash_ids(ids: jax.Array) -> jax.Array:
  """A cheap 32-bit mixing hash of non-negative int32 ids; returns uint32."""
  x = ids.astype(jnp.uint32)
  x = x ^ (x >> 16)
  x = x * _HASH_MUL
  x = x ^ (x >> 15)
  return x


class FusedEmbedding(nnx.Module):
  """One [R, D] table holding every feature's rows. The parameter is `self.table`.

  Its first `used_rows` rows are the features'; the rest only pad R to a multiple of `row_multiple`
  and are never looked up."""

  def __init__(self, tables: tuple[TableConfig, ...], *, row_multiple: int = 1,
               init_scale: float | None = None, rngs: nnx.Rngs):
    dims = {t.dim for t in tables}
    if len(dims) != 1:
      raise ValueError(f"a fused table needs one embedding dim for all features, got {sorted(dims)}")
    if row_multiple < 1:
      raise ValueError(f"row_multiple must be >= 1, got {row_multiple}")
    self.configs = tables
    self.dim = dims.pop()
    offsets = np.cumsum([0] + [t.num_rows for t in tables])
    self.offsets = tuple(int(o) for o in offsets[:-1])
    used = int(offsets[-1])
    self.used_rows = used
    self.num_rows = -(-used // row_multiple) * row_multiple
    scale = init_scale if init_scale is not None else 1.0 / np.sqrt(self.dim)
    init = jax.random.uniform(rngs.params(), (self.num_rows, self.dim), jnp.float32, -scale, scale)
    self.table = nnx.Param(init)

  def row_ids(self, sparse: jax.Array) -> jax.Array:
    """Maps ids i32 [B, Fs, L] to fused-table rows i32 [B, Fs, L] (feature order = configs)."""
    if sparse.shape[1] != len(self.configs):
      raise ValueError(f"sparse has {sparse.shape[1]} features, the table was built for {len(self.configs)}")
    cols = []
    for j, (t, off) in enumerate(zip(self.configs, self.offsets)):
      ids = sparse[:, j]
      if t.hashed:
        local = (hash_ids(ids) % jnp.uint32(t.num_rows)).astype(jnp.int32)
      else:
        local = ids
      cols.append(local + off)
    return jnp.stack(cols, axis=1)

  @staticmethod
  def gather(table: jax.Array, row_ids: jax.Array) -> jax.Array:
    """Rows of `table` at `row_ids`: [..., D]."""
    return jnp.take(table, row_ids, axis=0, mode="clip")

  def __call__(self, sparse: jax.Array, mask: jax.Array, combiner: str = "sum") -> jax.Array:
    """Looks up and pools in one go: [B, Fs, L] -> [B, Fs, D]."""
    return pool(self.gather(self.table[...], self.row_ids(sparse)), mask, combiner)


def pool(rows: jax.Array, mask: jax.Array, combiner: str = "sum") -> jax.Array:
  """Pools looked-up rows [B, Fs, L, D] over L under mask [B, Fs, L]: "sum" or "mean"."""
  m = mask.astype(rows.dtype)[..., None]
  s = jnp.sum(rows * m, axis=2)
  if combiner == "sum":
    return s
  if combiner == "mean":
    return s / jnp.maximum(jnp.sum(m, axis=2), 1.0)
  raise ValueError(f"combiner must be 'sum' or 'mean', got {combiner!r}")
