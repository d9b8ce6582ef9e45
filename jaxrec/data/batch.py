"""The Batch pytree and the feature Schema every data source and model agrees on.

Shapes (all static for a given pipeline; B = batch size):

    dense        f32  [B, Fd]     continuous features, already normalised by the source
    sparse       i32  [B, Fs, L]  categorical ids, one row of up to L ids per sparse feature;
                                  ids are >= 0 (hashed or vocabulary-encoded by the source)
    sparse_mask  bool [B, Fs, L]  True where `sparse` holds a real id (False = padding/missing)
    labels       f32  [B, T]      one column per objective (click, conversion, ...), in {0, 1}
    weights      f32  [B]         example weight; 0 marks padding rows of a ragged final batch
    domain       i32  [B]         domain / surface id in [0, num_domains)
    timestamp    i32  [B]         seconds (Unix time for real data, world time for the ads world)
    true_prob    f32  [B, T]      the known label probabilities (synthetic data only), else None

`Batch` is a `flax.struct.dataclass`, so it is a pytree that `jax.jit` and `jax.device_put` take.
On the host the same class holds numpy arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flax import struct

Array = Any  # np.ndarray on the host, jax.Array on device


@struct.dataclass
class Batch:
  dense: Array
  sparse: Array
  sparse_mask: Array
  labels: Array
  weights: Array
  domain: Array
  timestamp: Array
  true_prob: Array | None = None

  @property
  def batch_size(self) -> int:
    return self.labels.shape[0]


@dataclasses.dataclass(frozen=True)
class SparseFeature:
  """One categorical feature.

  vocab_size: ids lie in [0, vocab_size). None means the ids are raw hashes (any non-negative
    int32) and the embedding table must hash them into its rows.
  max_len: how many ids a row may hold (1 = one-hot). Rows with fewer are padded and masked.
  """

  name: str
  vocab_size: int | None
  max_len: int = 1


@dataclasses.dataclass(frozen=True)
class Schema:
  """Names and sizes of the features and objectives of one data source."""

  dense: tuple[str, ...]
  sparse: tuple[SparseFeature, ...]
  labels: tuple[str, ...]
  num_domains: int = 1

  @property
  def max_len(self) -> int:
    """L, the id-list length of `Batch.sparse` (the longest feature's max_len)."""
    return max((f.max_len for f in self.sparse), default=1)

  @property
  def num_dense(self) -> int:
    return len(self.dense)

  @property
  def num_sparse(self) -> int:
    return len(self.sparse)

  @property
  def num_tasks(self) -> int:
    return len(self.labels)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "Schema":
    return cls(
        dense=tuple(d["dense"]),
        sparse=tuple(SparseFeature(**f) for f in d["sparse"]),
        labels=tuple(d["labels"]),
        num_domains=int(d["num_domains"]),
    )


def batch_from_numpy(**fields: np.ndarray | None) -> Batch:
  """Builds a host Batch, casting each field to its documented dtype."""
  tp = fields.get("true_prob")
  return Batch(
      dense=np.asarray(fields["dense"], np.float32),
      sparse=np.asarray(fields["sparse"], np.int32),
      sparse_mask=np.asarray(fields["sparse_mask"], np.bool_),
      labels=np.asarray(fields["labels"], np.float32),
      weights=np.asarray(fields["weights"], np.float32),
      domain=np.asarray(fields["domain"], np.int32),
      timestamp=np.asarray(fields["timestamp"], np.int32),
      true_prob=None if tp is None else np.asarray(tp, np.float32),
  )
