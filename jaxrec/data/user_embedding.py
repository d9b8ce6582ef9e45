"""Downstream side of SUM: a batch source that appends a frozen user tower's embeddings.

`UserEmbeddingSource(base, tower)` wraps an ads-world source. Each batch it yields is the base
batch with K D more dense features, `user_emb_0 .. user_emb_{KD-1}`: the frozen tower's embedding
of the row's user at the row's time (the user's features and history snapshot, see
`jaxrec.data.user_history`, taken from the same stream the row comes from), computed by one jitted
forward of the user tower per batch. Everything else in the batch is unchanged, so any ranker and
`jaxrec.training.loop.train_and_evaluate` train on it as on any source; the tower's parameters
are only read, never updated (it is "frozen": downstream gradients cannot reach it, since the
embeddings arrive as input data).

`DataConfig.user_model = DIR` (`--data.user_model DIR` on `python -m train.ranker`) wraps the
training and eval sources this way with the tower trained by `python -m train.user_model
--workdir DIR`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxrec.data.batch import Batch, Schema
from jaxrec.data.sources import AdsWorldSource
from jaxrec.training.user_model import FrozenUserTower, UserModelError, load_user_model


def embedding_feature_names(n: int) -> tuple[str, ...]:
  return tuple(f"user_emb_{i}" for i in range(n))


class UserEmbeddingSource:
  """A BatchSource: `base`'s batches with the frozen tower's user embeddings as extra dense features."""

  def __init__(self, base: AdsWorldSource, tower: FrozenUserTower):
    if not isinstance(base, AdsWorldSource):
      raise UserModelError(f"a user model's embeddings need the ads world (its users and their history); "
                           f"this data source is a {type(base).__name__}")
    if base.world.cfg != tower.world_config:
      diff = [f.name for f in dataclasses.fields(tower.world_config)
              if getattr(base.world.cfg, f.name) != getattr(tower.world_config, f.name)]
      raise UserModelError(f"user model {str(tower.workdir)!r} was trained on another ads world (fields differ: "
                           f"{', '.join(diff)}); train it with the ranker's --data.world settings")
    self.base, self.tower = base, tower
    s = base.schema
    self.schema: Schema = dataclasses.replace(s, dense=s.dense + embedding_feature_names(tower.out_features))
    self.has_truth = base.has_truth

  def _with_embedding(self, batch: Batch) -> Batch:
    emb = self.tower.embed_batch(batch, self.base.world, self.base.stream)
    return dataclasses.replace(batch, dense=np.concatenate([batch.dense, emb.astype(np.float32)], axis=1))

  def train_batch(self, index: int, batch_size: int) -> Batch:
    return self._with_embedding(self.base.train_batch(index, batch_size))

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    for b in self.base.eval_batches(batch_size):
      yield self._with_embedding(b)


def with_user_embedding(train, evl, workdir: str | Path, *,
                        step: int | None = None) -> tuple[UserEmbeddingSource, UserEmbeddingSource]:
  """Wraps a (train, eval) pair of ads-world sources with the frozen tower of `workdir` (loaded once,
  its checkpoint at `step`, default the newest). UserModelError when the eval stream is the one the
  tower trained on: its embeddings would carry the eval rows' own labels into the ranker's inputs."""
  tower = load_user_model(workdir, step)
  if isinstance(evl, AdsWorldSource) and evl.stream == tower.config.data.train:
    raise UserModelError(f"user model {str(workdir)!r} was trained on the ads world's {evl.stream!r} stream, "
                         "the ranker's eval data: evaluating on rows the user model learned from would overstate "
                         "quality; pass another --data.eval stream, or train the user model on another one")
  return UserEmbeddingSource(train, tower), UserEmbeddingSource(evl, tower)
