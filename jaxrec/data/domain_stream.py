"""One domain's traffic of an ads-world stream, as its own example stream.

SUM's downstream models are many, each trained on its own surface's data; the data-poor ones are
those whose surface has little traffic. `DomainStreamSource(world, stream, domain)` is such a
surface's training data: the examples of the stream's requests on `domain`, in time order,
numbered from 0 (batch i = examples [i B, (i + 1) B) of that sub-stream). Every example is the same
(features, labels, true probabilities) as in the full stream: it is generated from the same request
(same request id, same hashes), only the others are skipped.

It is an `AdsWorldSource` (it has `.world` and `.stream`), so `UserEmbeddingSource` wraps it like the
full stream. Its eval stream is the domain's examples of its first `eval_examples` sub-stream rows.

>>> from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
>>> src = DomainStreamSource(AdsWorld(AdsWorldConfig.small()), "train", domain=3, eval_examples=64)
>>> b = src.train_batch(2, 64)
>>> b.labels.shape, set(b.domain.tolist())
((64, 2), {3})
"""

from __future__ import annotations

import threading
from typing import Iterator

import numpy as np

from jaxrec.data.adsworld import AdsWorld
from jaxrec.data.adsworld.hashing import stable_id
from jaxrec.data.adsworld.sample import make_examples
from jaxrec.data.batch import Batch
from jaxrec.data.pipeline import pad_batch
from jaxrec.data.sources import AdsWorldSource

_CHUNK_S = 21600.0  # world seconds of the full stream scanned at a time to index the domain's requests


class DomainStreamSource(AdsWorldSource):
  """The examples of `domain`'s requests in the ads world's `stream`, renumbered from 0."""

  def __init__(self, world: AdsWorld, stream: str, domain: int, eval_examples: int):
    if not 0 <= domain < world.cfg.num_domains:
      raise ValueError(f"domain must be in [0, {world.cfg.num_domains}), got {domain}")
    super().__init__(world, stream, eval_examples)
    self.domain = domain
    self._ids = np.zeros(0, np.int64)  # full-stream request ids of the domain's requests, in order
    self._scanned_s = 0.0  # world time up to which the full stream's requests were looked at
    self._lock = threading.Lock()

  def _request_ids(self, stop: int) -> np.ndarray:
    """The first `stop` domain requests' full-stream ids (IndexError past the stream's end)."""
    with self._lock:
      while self._ids.size < stop:
        if self._scanned_s >= self.world.cfg.horizon_s:
          raise IndexError(f"domain {self.domain} of stream {self.stream!r} has only {self._ids.size} requests "
                           f"over the horizon; asked for {stop}")
        hi = self._scanned_s + _CHUNK_S
        req = self.world.requests(self.stream, self._scanned_s, hi)
        self._ids = np.concatenate([self._ids, req.request_id[req.domain == self.domain]])
        self._scanned_s = hi
      return self._ids[:stop]

  def examples(self, start: int, stop: int) -> Batch:
    """Sub-stream examples [start, stop) as a host Batch."""
    K = self.world.cfg.candidates_per_request
    r0, r1 = start // K, (stop - 1) // K + 1
    ids = self._request_ids(r1)[r0:]
    requests = self.world.request_slice(self.stream, int(ids[0]), int(ids[-1]) + 1).take(ids - ids[0])
    batch, _ = make_examples(self.world.cfg, self.world.entities, stable_id(self.stream), requests,
                             start - r0 * K, stop - r0 * K)
    return batch

  def num_examples_before(self, timestamp_s: float) -> int:
    """How many of the domain's examples come from requests before `timestamp_s`."""
    req = self.world.requests(self.stream, 0.0, timestamp_s)
    return int(np.count_nonzero(req.domain == self.domain)) * self.world.cfg.candidates_per_request

  def train_batch(self, index: int, batch_size: int) -> Batch:
    return self.examples(index * batch_size, (index + 1) * batch_size)

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    for start in range(0, self.eval_examples, batch_size):
      yield pad_batch(self.examples(start, min(start + batch_size, self.eval_examples)), batch_size)
