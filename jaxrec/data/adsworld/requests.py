"""Bursty per-user request streams (ERCache's access pattern) and the time-ordered request log.

A user's requests come in sessions. Sessions start as a Poisson process (rate
`sessions_per_user_per_day` x the user's activity multiplier, modulated by a diurnal cycle) while the
user is active; a session has 1 + Geometric requests (mean `session_mean_requests`) separated by
short (exponential) or medium (log-normal) gaps. So a user's consecutive-request gaps are a mixture
of short, medium and long (between-session, hours) gaps; the defaults give about 52% under 60 s and
76% under 600 s, ERCache's measurement. Each session happens on one domain and device; each request
draws a placement from its domain's placement mix.

The log of a split is generated in pages of `PAGE_S` seconds of world time: page q's sessions come
from a generator seeded by (seed, split, q), sessions are capped at `PAGE_S` long, and the requests
that fall in page p are those of sessions started in pages p-1 and p. So any request's content is a
function of the seed and split alone, and the log can be read at any offset without generating all
of it (only the page sizes before it are counted, and remembered).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading

import numpy as np

from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.entities import TAG_SESSIONS, Entities

PAGE_S = 21600.0  # world seconds per page of the request log (also the longest session)
_CACHE_PAGES = 4


@dataclasses.dataclass(frozen=True)
class Requests:
  """Requests in time order, one row each (R rows).

  request_id   i64 [R]  position in its stream (0, 1, ... over the whole split)
  user_id      i32 [R]
  timestamp_s  f64 [R]  world seconds (t = 0 is a midnight)
  domain       i32 [R]
  device       i32 [R]
  placement    i32 [R]
  """

  request_id: np.ndarray
  user_id: np.ndarray
  timestamp_s: np.ndarray
  domain: np.ndarray
  device: np.ndarray
  placement: np.ndarray

  def __len__(self) -> int:
    return int(self.user_id.shape[0])

  def take(self, idx) -> "Requests":
    return Requests(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

  @staticmethod
  def concatenate(parts: list["Requests"]) -> "Requests":
    return Requests(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                       for f in dataclasses.fields(Requests)})


def _sessions(rng: np.random.Generator, cfg: AdsWorldConfig, ent: Entities, users: np.ndarray,
              lo: np.ndarray, hi: np.ndarray, cap_s: float) -> dict[str, np.ndarray]:
  """Requests of the sessions of `users` that start in [lo, hi) (per user), unsorted.

  Sessions longer than `cap_s` lose their requests past it. Returns per-request arrays user_id,
  timestamp_s, domain, device, placement.
  """
  span = np.maximum(hi - lo, 0.0)
  amp = cfg.diurnal_amplitude
  rate = cfg.sessions_per_user_per_day / 86400.0 * ent.user_activity[users]
  n = rng.poisson(rate * span * (1.0 + amp))
  owner = np.repeat(np.arange(users.size), n)
  start = lo[owner] + rng.random(owner.size) * span[owner]
  # thinning by the diurnal cycle: keep with probability (1 + a cos(phase)) / (1 + a)
  phase = 2.0 * np.pi * (start / 86400.0 - cfg.diurnal_peak_hour / 24.0)
  keep = rng.random(owner.size) * (1.0 + amp) < 1.0 + amp * np.cos(phase)
  user, start = users[owner[keep]], start[keep]
  num = user.size
  domain = np.minimum(np.searchsorted(ent.domain_cdf, rng.random(num), side="right"), cfg.num_domains - 1)
  device = np.where(rng.random(num) < cfg.primary_device_prob, ent.user_device[user],
                    rng.integers(0, cfg.num_devices, num))
  length = rng.geometric(1.0 / cfg.session_mean_requests, num)

  # expand sessions into requests: times = start + cumulative within-session gaps
  sess = np.repeat(np.arange(num), length)
  first = np.cumsum(length) - length
  total = sess.size
  short = rng.exponential(cfg.gap_short_mean_s, total)
  medium = np.exp(np.log(cfg.gap_medium_median_s) + cfg.gap_medium_sigma * rng.standard_normal(total))
  gaps = np.where(rng.random(total) < cfg.gap_short_weight, short, medium)
  gaps[first] = 0.0
  offset = np.cumsum(gaps)
  offset -= offset[first][sess]
  placement_u = rng.random(total)
  dom = domain[sess]
  flat = (ent.placement_cdf + np.arange(cfg.num_domains)[:, None]).ravel()
  placement = np.searchsorted(flat, dom + placement_u, side="right") - dom * cfg.num_placements
  placement = np.clip(placement, 0, cfg.num_placements - 1)
  ok = offset < cap_s
  return {
      "user_id": user[sess][ok].astype(np.int32),
      "timestamp_s": (start[sess] + offset)[ok],
      "domain": dom[ok].astype(np.int32),
      "device": device[sess][ok].astype(np.int32),
      "placement": placement[ok].astype(np.int32),
  }


def _to_requests(parts: dict[str, np.ndarray], first_id: int) -> Requests:
  order = np.argsort(parts["timestamp_s"], kind="stable")
  fields = {k: v[order] for k, v in parts.items()}
  return Requests(request_id=np.arange(first_id, first_id + order.size, dtype=np.int64), **fields)


def simulate_requests(cfg: AdsWorldConfig, ent: Entities, num_users: int, duration_s: float,
                      rng: np.random.Generator) -> Requests:
  """Requests of users [0, num_users) over [0, duration_s), all treated as always active (no churn)."""
  users = np.arange(num_users)
  parts = _sessions(rng, cfg, ent, users, np.zeros(num_users), np.full(num_users, float(duration_s)), np.inf)
  keep = parts["timestamp_s"] < duration_s
  return _to_requests({k: v[keep] for k, v in parts.items()}, 0)


def _locked(method):
  """Runs a RequestLog method under the log's lock."""

  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    with self._lock:
      return method(self, *args, **kwargs)

  return wrapper


class RequestLog:
  """The time-ordered request log of one split, generated page by page on demand.

  Thread-safe: the page caches are guarded by one re-entrant lock (grain's prefetch threads
  read batches concurrently).
  """

  def __init__(self, cfg: AdsWorldConfig, ent: Entities, split_key: int):
    self._cfg, self._ent, self._split_key = cfg, ent, split_key
    self.num_pages = int(np.ceil(cfg.horizon_s / PAGE_S))
    self._sessions_cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._page_cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
    self._prefix = [0]  # _prefix[p] = requests in pages [0, p)
    self._lock = threading.RLock()

  @staticmethod
  def _lru_get(cache: collections.OrderedDict, key: int, make):
    if key in cache:
      cache.move_to_end(key)
      return cache[key]
    value = cache[key] = make()
    if len(cache) > _CACHE_PAGES:
      cache.popitem(last=False)
    return value

  def _page_sessions(self, q: int) -> dict:
    cfg, ent = self._cfg, self._ent

    def make():
      rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, TAG_SESSIONS, self._split_key, q]))
      lo = np.maximum(ent.user_start_s, q * PAGE_S)
      hi = np.minimum(np.minimum(ent.user_end_s, (q + 1) * PAGE_S), cfg.horizon_s)
      return _sessions(rng, cfg, ent, np.arange(cfg.num_users), lo, hi, PAGE_S)

    return self._lru_get(self._sessions_cache, q, make)

  def _page(self, p: int) -> dict:
    """Page p's requests (time-sorted, without ids)."""

    def make():
      lo, hi = p * PAGE_S, min((p + 1) * PAGE_S, self._cfg.horizon_s)
      parts = [self._page_sessions(q) for q in (p - 1, p) if q >= 0]
      merged = {k: np.concatenate([x[k] for x in parts]) for k in parts[0]}
      t = merged["timestamp_s"]
      keep = (t >= lo) & (t < hi)
      merged = {k: v[keep] for k, v in merged.items()}
      order = np.argsort(merged["timestamp_s"], kind="stable")
      return {k: v[order] for k, v in merged.items()}

    return self._lru_get(self._page_cache, p, make)

  def _count_through(self, p: int) -> None:
    while len(self._prefix) <= p + 1 and len(self._prefix) <= self.num_pages:
      q = len(self._prefix) - 1
      self._prefix.append(self._prefix[-1] + self._page(q)["user_id"].size)

  @_locked
  def num_requests(self) -> int:
    """All requests of the split over the horizon (generates every page once)."""
    self._count_through(self.num_pages - 1)
    return self._prefix[-1]

  def page_of_time(self, t: float) -> int:
    return int(min(max(t, 0.0) // PAGE_S, self.num_pages - 1))

  @_locked
  def slice(self, start: int, stop: int) -> Requests:
    """Requests [start, stop) of the log. Raises IndexError past its end."""
    if start < 0 or stop < start:
      raise IndexError(f"bad request range [{start}, {stop})")
    p = 0
    parts = []
    while True:
      self._count_through(p)
      if p >= self.num_pages:
        raise IndexError(f"request range [{start}, {stop}) runs past the end of the stream "
                         f"({self._prefix[-1]} requests over the {self._cfg.horizon_days}-day horizon)")
      lo, hi = self._prefix[p], self._prefix[p + 1]
      if hi > start and lo < stop:
        page = self._page(p)
        a, b = max(start, lo) - lo, min(stop, hi) - lo
        parts.append(Requests(request_id=np.arange(lo + a, lo + b, dtype=np.int64),
                              **{k: v[a:b] for k, v in page.items()}))
      if hi >= stop:
        break
      p += 1
    if not parts:
      return _to_requests({k: v[:0] for k, v in self._page(0).items()}, start)
    return parts[0] if len(parts) == 1 else Requests.concatenate(parts)

  @_locked
  def between(self, start_s: float, end_s: float) -> Requests:
    """All requests with start_s <= timestamp < end_s."""
    p0, p1 = self.page_of_time(start_s), self.page_of_time(end_s)
    self._count_through(p1)
    parts = []
    for p in range(p0, p1 + 1):
      page = self._page(p)
      t = page["timestamp_s"]
      a, b = np.searchsorted(t, start_s, "left"), np.searchsorted(t, end_s, "left")
      parts.append(Requests(request_id=np.arange(self._prefix[p] + a, self._prefix[p] + b, dtype=np.int64),
                            **{k: v[a:b] for k, v in page.items()}))
    return Requests.concatenate(parts)
