"""Replaying a request stream through ERCache's device tiers, one request at a time.

`replay(stream, fresh, policy)` runs every request of a time-ordered stream through the same
jitted cache functions the server uses (`ercache.lookup`, then `ercache.resolve_after_inference`
for the rows that need the user model), inside one compiled `lax.scan` over the requests, so a
request sees exactly the writes of the requests before it. The user model's output is given:
`fresh[r]` is the embedding user-model inference would return for request r (computed up front
by the caller, e.g. the frozen user tower at the request's time), and `policy.failure_rate`
makes a seeded fraction of inferences fail (timeout or error). A failed inference takes the
failover tier when `policy.failover` is on, else the fallback (the cache's default embedding).

With `policy.soap` the request path never waits for the user model (SUM's SOAP): a request is
served the newest embedding available (`ercache.latest`: the direct tier, else the failover
ring's stale one, else the fallback) and, when that was not a direct hit, the inference it
triggers is written back for later requests (as the background worker would, before the
user's next request arrives); a failed inference writes nothing.

The trace says, per request: the source (`ercache.Source`: DIRECT means inference was skipped),
the served embedding, and its age in seconds (0 for FRESH, -1 for FALLBACK).

>>> import numpy as np
>>> stream = AccessStream(user_id=np.array([1, 1, 2, 1]), time_s=np.array([0, 30, 40, 100]))
>>> fresh = np.arange(4, dtype=np.float32)[:, None]            # [R, D=1]: request r's embedding is r
>>> trace = replay(stream, fresh, ReplayPolicy(direct_ttl_s=60))
>>> [Source(s).name for s in trace.source], trace.age.tolist(), trace.embedding[:, 0].tolist()
(['FRESH', 'DIRECT', 'FRESH', 'FRESH'], [0, 30, 0, 0], [0.0, 0.0, 2.0, 3.0])
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.cache import ercache
from jaxrec.cache.ercache import ERCacheConfig, ERCacheState, Source
from jaxrec.cache.hash_table import split_keys


@dataclasses.dataclass(frozen=True)
class AccessStream:
  """Requests in time order: user_id int64 [R], time_s int64 [R] (non-decreasing, seconds)."""

  user_id: np.ndarray
  time_s: np.ndarray
  name: str = ""

  def __post_init__(self):
    u, t = np.asarray(self.user_id), np.asarray(self.time_s)
    if u.ndim != 1 or u.shape != t.shape:
      raise ValueError(f"user_id and time_s must be 1-D of one length, got {u.shape} and {t.shape}")
    if u.size and (u.min() < 0 or np.any(np.diff(t) < 0)):
      raise ValueError("user ids must be >= 0 and times non-decreasing")
    if t.size and t[-1] - t[0] >= 2**31 - 1:
      raise ValueError("the stream spans more than 2**31 s; the cache clock is int32 seconds")

  def __len__(self) -> int:
    return int(np.asarray(self.user_id).shape[0])


@dataclasses.dataclass(frozen=True)
class ReplayPolicy:
  """One cache setting to replay (ERCache's per-model knobs plus injected failures)."""

  direct_ttl_s: int = 60
  failover: bool = True
  """serve a stale embedding from the failover tier when inference fails; off: the fallback"""
  failover_ttl_s: int = 86_400
  failure_rate: float = 0.0
  """fraction of user-model inferences that fail (drawn per request, seeded)"""
  stabilize_m: int = 1
  capacity: int = 1 << 14
  """slots of the direct tier; the failover tier gets twice as many"""
  seed: int = 0
  soap: bool = False
  """SOAP: serve the newest cached embedding at once and write the fresh one back for later requests"""

  def __post_init__(self):
    if not 0.0 <= self.failure_rate <= 1.0:
      raise ValueError(f"failure_rate must be in [0, 1], got {self.failure_rate}")

  def cache_config(self, dim: int, dtype: str = "float32") -> ERCacheConfig:
    return ERCacheConfig(dim=dim, direct_ttl_s=self.direct_ttl_s,
                         failover_ttl_s=max(self.failover_ttl_s, self.direct_ttl_s), direct_capacity=self.capacity,
                         failover_capacity=2 * self.capacity, dtype=dtype, stabilize_m=self.stabilize_m)


@dataclasses.dataclass(frozen=True)
class Trace:
  """Per request r of the replayed stream (host numpy, R rows)."""

  source: np.ndarray  # i32 [R], an ercache.Source (never NEEDS_INFERENCE)
  age: np.ndarray  # i32 [R] seconds since the served embedding was computed; -1 for FALLBACK
  embedding: np.ndarray  # f32 [R, D] the embedding served
  failed: np.ndarray  # bool [R] inference was needed and failed


def failures(n: int, rate: float, seed: int) -> np.ndarray:
  """bool [n]: which requests' user-model inference fails (if they need one), seeded."""
  return np.random.default_rng(np.random.SeedSequence([seed, 0xFA17])).random(n) < rate


@functools.partial(jax.jit, static_argnames=("use_failover", "soap"))
def _scan(state: ERCacheState, hi, lo, times, fresh, ok, *, use_failover: bool, soap: bool):
  def step(state, x):
    h, l, now, emb, good = x
    ids = (h[None], l[None])
    if soap:
      state, served = ercache.latest(state, ids, now)
      state = ercache.write(state, ids, emb[None], now, 0, (served.source != Source.DIRECT) & good[None])
    else:
      state, looked = ercache.lookup(state, ids, now)
      state, served = ercache.resolve_after_inference(state, ids, now, looked, emb[None], good[None], 0)
    if not use_failover:  # no failover tier: a failed inference gets the default embedding
      gone = served.source == Source.FAILOVER
      served = served.replace(embedding=jnp.where(gone[:, None], state.fallback, served.embedding),
                              source=jnp.where(gone, jnp.int32(Source.FALLBACK), served.source),
                              age=jnp.where(gone, -1, served.age))
    return state, (served.source[0], served.age[0], served.embedding[0])

  return jax.lax.scan(step, state, (hi, lo, times, fresh, ok))


def replay(stream: AccessStream, fresh: np.ndarray, policy: ReplayPolicy) -> Trace:
  """Runs `stream` through a fresh ERCache of `policy`; `fresh` [R, D] is each request's inference."""
  fresh = np.asarray(fresh, np.float32)
  n = len(stream)
  if fresh.ndim != 2 or fresh.shape[0] != n:
    raise ValueError(f"fresh must be [{n}, D], got {fresh.shape}")
  state = ERCacheState.create(policy.cache_config(fresh.shape[1]))
  hi, lo = split_keys(np.asarray(stream.user_id, np.int64))
  t = np.asarray(stream.time_s, np.int64)
  times = jnp.asarray((t - (t[0] if n else 0)).astype(np.int32))
  failed = failures(n, policy.failure_rate, policy.seed)
  _, (source, age, emb) = _scan(state, hi, lo, times, jnp.asarray(fresh), jnp.asarray(~failed),
                                use_failover=policy.failover, soap=policy.soap)
  source, age, emb = jax.device_get((source, age, emb))
  needed = source != Source.DIRECT
  return Trace(source=np.asarray(source), age=np.asarray(age), embedding=np.asarray(emb), failed=failed & needed)


def summarize(trace: Trace, window: np.ndarray | None = None) -> dict:
  """Counts over the requests in `window` (bool [R], default all): inferences saved (DIRECT share),
  fresh/failover/fallback shares, failed inferences, and served-age quantiles (s) over the rows
  served a cached embedding (DIRECT or FAILOVER). Shares and ages of an empty window are NaN."""
  w = np.ones(trace.source.shape, bool) if window is None else np.asarray(window, bool)
  src = trace.source[w]
  n = int(src.size)
  out = {"requests": n}
  for s in (Source.DIRECT, Source.FRESH, Source.FAILOVER, Source.FALLBACK):
    out[s.name.lower()] = int(np.sum(src == s))
  out["inferences"] = n - out["direct"]
  out["inferences_saved"] = out["direct"] / n if n else float("nan")
  out["failed_inferences"] = int(np.sum(trace.failed[w]))
  cached = trace.age[w][(src == Source.DIRECT) | (src == Source.FAILOVER)]
  served = trace.age[w][src != Source.FALLBACK]
  for name, a in (("cached_age", cached), ("served_age", served)):
    q = np.quantile(a, [0.5, 0.9, 0.99]) if a.size else [np.nan] * 3
    out[name] = {"mean": float(a.mean()) if a.size else float("nan"), "p50": float(q[0]), "p90": float(q[1]),
                 "p99": float(q[2]), "max": float(a.max()) if a.size else float("nan")}
  return out


__all__ = ["AccessStream", "ReplayPolicy", "Trace", "failures", "replay", "summarize"]
