"""Recent-history user features for the ads world, derived from a stream's own past clicks.

The ads world has no history feature, so one is derived from the request stream being read,
without ever looking at the labels of the example being predicted:

  World time is cut into buckets of `HistoryConfig.bucket_s` seconds. The history of user u at
  time t is a snapshot taken at the start of t's bucket, b = floor(t / bucket_s): the user's last
  `max_clicks` clicked ads over every request of the same stream with timestamp < b * bucket_s,
  plus the user's impressions and clicks over those requests, exponentially decayed with a half-life
  of `half_life_days`. The request of the example itself (timestamp t >= b * bucket_s) and every
  later one are never in it, so no label of the predicted row, nor of its request, leaks; the
  snapshot lags by up to one bucket, as a logged feature would in production.

Features added to a Batch (`history_schema`, `add_history`):

    hist_ads           sparse, up to H = max_clicks ids: the clicked ads, most recent last
    hist_advertisers   sparse, H ids: their advertisers
    hist_categories    sparse, H ids: their categories
    hist_log_impressions, hist_log_clicks   dense: log1p of the decayed counts
    hist_ctr_logit     dense: log((clicks + 1) / (impressions - clicks + 9)), a smoothed click-rate
                       logit (prior 10%)

Cost: snapshot b needs the examples of every bucket before it, so a stream's history is built by
one pass over the stream from world time 0, bucket by bucket, the first time a later time is asked
for (about as much generation again as reading the stream). Snapshots are kept (U x H ad ids and
U x 2 counts each: about 24 KB per hour of world time for 1000 users and H = 8), so later reads
are lookups.
`user_history(world, stream, cfg)` returns one shared, thread-safe `UserHistory` per stream.

>>> from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
>>> world = AdsWorld(AdsWorldConfig.small())
>>> hist = user_history(world, "train", HistoryConfig(max_clicks=4))
>>> b = add_history(world.batch("train", 40, 64), world, hist)
>>> b.sparse.shape, b.dense.shape
((64, 12, 4), (64, 10))
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Iterator

import numpy as np

from jaxrec.data.adsworld import AdsWorld
from jaxrec.data.batch import Batch, Schema, SparseFeature
from jaxrec.data.sources import AdsWorldSource

HIST_SPARSE = ("hist_ads", "hist_advertisers", "hist_categories")
HIST_DENSE = ("hist_log_impressions", "hist_log_clicks", "hist_ctr_logit")


@dataclasses.dataclass(frozen=True)
class HistoryConfig:
  bucket_s: float = 3600.0
  """history snapshots are taken at the start of each bucket of world time this long (seconds); an
  example at time t sees the clicks of requests before floor(t / bucket_s) * bucket_s"""
  max_clicks: int = 8
  """H, the most recent clicked ads kept per user"""
  half_life_days: float = 1.0
  """half-life of the decayed impression and click counts"""

  def __post_init__(self):
    if not self.bucket_s > 0 or not self.half_life_days > 0:
      raise ValueError(f"history.bucket_s and history.half_life_days must be > 0, got {self.bucket_s}, "
                       f"{self.half_life_days}")
    if self.max_clicks < 1:
      raise ValueError(f"history.max_clicks must be >= 1, got {self.max_clicks}")


@dataclasses.dataclass(frozen=True, eq=False)
class Snapshot:
  """Every user's history at the start of one bucket: ads [U, H] (-1 = none, most recent last) and
  decayed counts [U, 2] (impressions, clicks)."""

  ads: np.ndarray
  counts: np.ndarray


class UserHistory:
  """The history snapshots of one ads-world stream, built lazily in time order. Thread-safe."""

  def __init__(self, world: AdsWorld, stream: str, cfg: HistoryConfig):
    self.world, self.stream, self.cfg = world, stream, cfg
    U, H = world.cfg.num_users, cfg.max_clicks
    self._ad_dtype = np.int16 if world.cfg.num_ads < np.iinfo(np.int16).max else np.int32
    self._snapshots = [Snapshot(np.full((U, H), -1, self._ad_dtype), np.zeros((U, 2), np.float32))]
    self._decay = 0.5 ** (cfg.bucket_s / (cfg.half_life_days * 86400.0))
    self._last_bucket = int(np.ceil(world.cfg.horizon_s / cfg.bucket_s))  # nothing changes after it
    self._lock = threading.Lock()

  def bucket(self, timestamp_s: np.ndarray) -> np.ndarray:
    """i64: the bucket of each time (clipped to [0, the horizon's bucket])."""
    b = np.floor(np.asarray(timestamp_s, np.float64) / self.cfg.bucket_s).astype(np.int64)
    return np.clip(b, 0, self._last_bucket)

  def snapshot(self, b: int) -> Snapshot:
    """The history at the start of bucket b (built from buckets 0 .. b-1 on first use)."""
    with self._lock:
      while len(self._snapshots) <= b:
        self._snapshots.append(self._advance(self._snapshots[-1], len(self._snapshots) - 1))
      return self._snapshots[b]

  def _advance(self, snap: Snapshot, b: int) -> Snapshot:
    """The snapshot after bucket b's requests, from the one before them."""
    lo, hi = b * self.cfg.bucket_s, (b + 1) * self.cfg.bucket_s
    requests = self.world.requests(self.stream, lo, hi)
    U, H = snap.ads.shape
    counts = snap.counts * np.float32(self._decay)
    if requests.request_id.size == 0:
      return Snapshot(snap.ads, counts)
    K = self.world.cfg.candidates_per_request
    first, last = int(requests.request_id[0]), int(requests.request_id[-1])
    _, ex = self.world.examples(self.stream, first * K, (last + 1) * K)
    user, click = ex["user_id"], ex["click"]
    counts = counts + np.stack([np.bincount(user, minlength=U), np.bincount(user[click], minlength=U)],
                               axis=1).astype(np.float32)
    # merge each user's old list with the bucket's clicks (time order) and keep the last H
    old_u, old_pos = np.nonzero(snap.ads >= 0)
    cat_user = np.concatenate([old_u, user[click]])
    cat_ad = np.concatenate([snap.ads[old_u, old_pos].astype(np.int64), ex["ad_id"][click]])
    cat_key = np.concatenate([old_pos - H, np.arange(int(click.sum()))])  # old entries come first
    order = np.lexsort((cat_key, cat_user))
    cat_user, cat_ad = cat_user[order], cat_ad[order]
    n = np.bincount(cat_user, minlength=U)
    start = np.cumsum(n) - n
    pos = np.arange(cat_user.size) - start[cat_user]
    col = H - n[cat_user] + pos  # right-aligned: the newest click lands in column H - 1
    keep = col >= 0
    ads = np.full((U, H), -1, self._ad_dtype)
    ads[cat_user[keep], col[keep]] = cat_ad[keep]
    return Snapshot(ads, counts)

  def lookup(self, user_id: np.ndarray, timestamp_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ads i64 [N, H] with -1 for none, counts f32 [N, 2]) of users at times (both [N])."""
    user_id = np.asarray(user_id, np.int64)
    b = self.bucket(timestamp_s)
    ads = np.empty((user_id.size, self.cfg.max_clicks), np.int64)
    counts = np.empty((user_id.size, 2), np.float32)
    for k in np.unique(b):
      rows = np.nonzero(b == k)[0]
      snap = self.snapshot(int(k))
      ads[rows] = snap.ads[user_id[rows]]
      counts[rows] = snap.counts[user_id[rows]]
    return ads, counts


@functools.lru_cache(maxsize=8)
def user_history(world: AdsWorld, stream: str, cfg: HistoryConfig) -> UserHistory:
  """The shared UserHistory of (world, stream, cfg), so every reader of a stream reuses its snapshots."""
  return UserHistory(world, stream, cfg)


def history_schema(schema: Schema, world: AdsWorld, cfg: HistoryConfig) -> Schema:
  """The ads world's schema with the history features appended (sparse ones of max_len H)."""
  H, wc = cfg.max_clicks, world.cfg
  extra = (SparseFeature("hist_ads", wc.num_ads, H), SparseFeature("hist_advertisers", wc.num_advertisers, H),
           SparseFeature("hist_categories", wc.num_ad_categories, H))
  return dataclasses.replace(schema, sparse=schema.sparse + extra, dense=schema.dense + HIST_DENSE)


def history_features(world: AdsWorld, hist: UserHistory, user_id: np.ndarray,
                     timestamp_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(sparse i32 [N, 3, H], mask bool [N, 3, H], dense f32 [N, 3]): the history features."""
  ads, counts = hist.lookup(user_id, timestamp_s)
  mask = ads >= 0
  safe = np.where(mask, ads, 0)
  ent = world.entities
  sparse = np.stack([safe, ent.ad_advertiser[safe], ent.ad_category[safe]], axis=1).astype(np.int32)
  impressions, clicks = counts[:, 0], counts[:, 1]
  dense = np.stack([np.log1p(impressions), np.log1p(clicks),
                    np.log((clicks + 1.0) / (impressions - clicks + 9.0))], axis=1).astype(np.float32)
  return sparse * mask[:, None, :], np.repeat(mask[:, None, :], 3, axis=1), dense


def add_history(batch: Batch, world: AdsWorld, hist: UserHistory) -> Batch:
  """An ads-world batch with the history features of its rows appended (schema: `history_schema`).

  Each row's user is its `user_id` feature (sparse column 0) and its time `batch.timestamp`; its
  history is the snapshot of that time's bucket (see the module docstring).
  """
  user_col = [f.name for f in world.schema.sparse].index("user_id")
  user = batch.sparse[:, user_col, 0]
  h_sparse, h_mask, h_dense = history_features(world, hist, user, batch.timestamp)
  H = hist.cfg.max_clicks
  pad = [(0, 0), (0, 0), (0, H - batch.sparse.shape[2])]
  return dataclasses.replace(
      batch,
      sparse=np.concatenate([np.pad(batch.sparse, pad), h_sparse], axis=1),
      sparse_mask=np.concatenate([np.pad(batch.sparse_mask, pad), h_mask], axis=1),
      dense=np.concatenate([batch.dense, h_dense], axis=1),
  )


class HistorySource:
  """A BatchSource: an ads-world source's batches with each row's history features appended."""

  def __init__(self, base: AdsWorldSource, cfg: HistoryConfig):
    self.base, self.cfg = base, cfg
    self.world = base.world
    self.history = user_history(base.world, base.stream, cfg)
    self.schema = history_schema(base.schema, base.world, cfg)
    self.has_truth = base.has_truth

  def train_batch(self, index: int, batch_size: int) -> Batch:
    return add_history(self.base.train_batch(index, batch_size), self.world, self.history)

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    for b in self.base.eval_batches(batch_size):
      yield add_history(b, self.world, self.history)
