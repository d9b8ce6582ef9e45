"""grain pipelines that turn a batch source into fixed-shape host batches.

A *batch source* is anything with `.schema`, `.has_truth` (its batches carry `true_prob`),
`.train_batch(index, batch_size) -> Batch` (deterministic in index) and
`.eval_batches(batch_size) -> iterator of Batch`. Two exist:
`ExamplesSource` (a dataset parsed into memory) and `AdsWorldSource` (the synthetic world,
generated on the fly). Because training batch i is a pure function of i, resuming at step N
only needs N: a restored run sees exactly the batches an uninterrupted run would have seen.

Eval batches are padded to the full batch size; padding rows carry weight 0.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import grain
import numpy as np

from jaxrec.data.batch import Batch, Schema
from jaxrec.data.errors import DataSpecError
from jaxrec.data.examples import Examples


class BatchSource(Protocol):
  schema: Schema
  has_truth: bool  # batches carry `true_prob`

  def train_batch(self, index: int, batch_size: int) -> Batch: ...

  def eval_batches(self, batch_size: int) -> Iterator[Batch]: ...


def pad_batch(b: Batch, batch_size: int) -> Batch:
  """Pads a host batch of n <= batch_size rows to batch_size rows of weight 0."""
  n = b.labels.shape[0]
  if n == batch_size:
    return b
  if n > batch_size:
    raise ValueError(f"batch of {n} rows does not fit batch_size {batch_size}")

  def pad(x):
    if x is None:
      return None
    widths = [(0, batch_size - n)] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths)

  return Batch(**{f.name: pad(getattr(b, f.name)) for f in dataclasses.fields(Batch)})


class ExamplesSource:
  """Batches from in-memory Examples: reshuffled every epoch with a seeded permutation."""

  def __init__(self, examples: Examples, *, seed: int = 0, shuffle: bool = True):
    self.examples, self.seed, self.shuffle = examples, seed, shuffle
    self.schema = examples.schema
    self.has_truth = examples.data.true_prob is not None
    self._cache: tuple[int, np.ndarray] = (-1, np.arange(0))  # (epoch, permutation), swapped atomically

  def __len__(self) -> int:
    return len(self.examples)

  def _permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, perm = self._cache
    if cached_epoch != epoch:
      n = len(self.examples)
      perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      self._cache = (epoch, perm)
    return perm

  def train_batch(self, index: int, batch_size: int) -> Batch:
    n = len(self.examples)
    per_epoch = n // batch_size
    if per_epoch == 0:
      raise DataSpecError(f"batch size {batch_size} is larger than the {n} training examples of "
                       f"{self.examples.source or 'this source'}; pass a smaller --data.batch_size")
    epoch, pos = divmod(index, per_epoch)
    rows = self._permutation(epoch)[pos * batch_size:(pos + 1) * batch_size]
    return self.examples.rows(np.sort(rows))

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    n = len(self.examples)
    for start in range(0, n, batch_size):
      yield pad_batch(self.examples.rows(np.arange(start, min(start + batch_size, n))), batch_size)


def train_iterator(source: BatchSource, *, batch_size: int, start: int, stop: int,
                   num_threads: int = 2, prefetch: int = 8) -> grain.DatasetIterator:
  """Training batches start..stop-1 through a grain pipeline with threaded prefetch (an iterator of
  Batch; `close()` it when stopping early, which ends its prefetch threads)."""
  ds = grain.MapDataset.range(start, stop).map(lambda i: source.train_batch(int(i), batch_size))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
