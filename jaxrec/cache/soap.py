"""SOAP: latency-free user embeddings. Requests never wait for the user model.

SUM's online platform (arXiv 2311.09544; ../shared/reference/papers.md section 3) serves each
request the newest embedding available and computes a fresh one off the request path.
`SoapCache` does this over one user model's `ERCacheState`:

- `serve(user_ids)` runs `ercache.latest` (direct tier, else the failover ring, else the fallback)
  and returns at once with device arrays; rows that were not DIRECT are handed to a background
  thread through a bounded queue (when it is full the refresh is dropped and counted, never
  waited for);
- the worker groups queued users into batches of at most `max_batch` (waiting at most
  `max_wait_s` to fill one), drops duplicates and users refreshed meanwhile, calls
  `user_model(ids int64 [P]) -> [P, D]` (P: the batch padded to a power-of-two bucket by repeating
  its last id, so a jitted model compiles once per bucket; padding rows are discarded), and
  writes the result to both tiers with `ercache.write`;
- embedding stabilization is the cache's: with `ERCacheConfig.stabilize_m = m` every served
  embedding is the mean of the user's last m embeddings, so a new user-model version moves
  downstream inputs by 1/m of the shift per refresh;
- a user model that raises (or returns the wrong shape) fails only its batch: the users are
  counted in `refresh_failures` and keep being served from the failover tier, and are retried on
  their next request.

The state is swapped under a lock held only to dispatch a jitted call, never while the user
model runs (every cache call donates the state, so it is touched only under that lock). Use as a
context manager, or `start()` then `close()`:

    with SoapCache(ERCacheState.create(cfg), user_model, SoapConfig(max_batch=256)) as soap:
      served = soap.serve(np.array([user_id, ...]))    # Served, rows [B]
    # close(drain=True): refreshes already queued are computed and written before it returns
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.cache import ercache
from jaxrec.cache.ercache import ERCacheState, Served, Source
from jaxrec.cache.hash_table import split_keys

log = logging.getLogger(__name__)

UserModel = Callable[[np.ndarray], Any]  # int64 user ids [P] -> embeddings [P, D] (numpy or jax)

WORKER_COUNTERS = (
    "refresh_enqueued",  # requests (batches of rows) handed to the worker
    "refresh_dropped",  # requests not handed over: queue full, closed, or discarded by close(drain=False)
    "refresh_requested",  # users the worker saw that were not served DIRECT
    "refresh_skipped",  # users dropped by the worker: duplicates, or refreshed since they were queued
    "refresh_written",  # users whose fresh embedding was written
    "refresh_failures",  # users whose user-model call raised or returned a bad shape
    "refresh_batches",  # user-model calls
    "refresh_failed_batches",  # user-model calls that failed
)


@dataclasses.dataclass(frozen=True)
class SoapConfig:
  max_batch: int = 256  # users per user-model call
  max_wait_s: float = 0.002  # how long the worker waits for more users to fill a batch
  queue_size: int = 1024  # requests waiting for the worker; beyond it refreshes are dropped
  min_bucket: int = 8  # batches are padded to powers of two from this (one compile per bucket)
  max_abs: float = math.inf  # an embedding with a value beyond this (or NaN / inf) is not written

  def __post_init__(self):
    if self.max_batch < 1 or self.queue_size < 1 or self.min_bucket < 1 or self.max_wait_s < 0 or not self.max_abs > 0:
      raise ValueError(f"bad SoapConfig {self}")


def usable(emb, max_abs: float = math.inf) -> np.ndarray:
  """bool [N]: rows of embeddings [N, D] that may be cached and served: every value finite and
  |value| <= max_abs. A request's features far outside the training data can drive a user model to
  such values; cached, they would be served to that user's later requests until they expire. On the
  host (numpy): a jnp test would compile per bucket shape on the serving threads."""
  e = np.asarray(emb, np.float32)
  return np.isfinite(e).all(axis=-1) & (np.abs(e) <= max_abs).all(axis=-1)


def bucket(n: int, min_bucket: int) -> int:
  """The padded batch size for n rows: the smallest power of two >= max(n, min_bucket)."""
  return 1 << (max(n, min_bucket, 1) - 1).bit_length()


def _padded_keys(ids: np.ndarray, size: int):
  pad = np.zeros(size, np.int64)
  pad[:ids.shape[0]] = ids
  valid = np.zeros(size, bool)
  valid[:ids.shape[0]] = True
  return split_keys(pad), jnp.asarray(valid)


def _default_clock() -> int:
  return int(time.monotonic())


class SoapCache:
  """One user model's cache, served without waiting and refreshed by a background thread.

  `clock() -> int` seconds (monotone) times lookups and writes; `version` tags the embeddings
  written (see `set_user_model`).
  """

  def __init__(self, state: ERCacheState, user_model: UserModel, config: SoapConfig = SoapConfig(), *,
               version: int = 0, clock: Callable[[], int] = _default_clock):
    self.config = config
    self._state = state
    self.cache_config = state.config
    self._user_model = user_model
    self._version = version
    self._clock = clock
    self._lock = threading.Lock()  # guards _state, _user_model, _version
    self._queue: queue.Queue = queue.Queue(config.queue_size)
    self._idle = threading.Condition()  # guards _pending, _counters
    self._pending = 0  # queued or in-process requests
    self._counters = dict.fromkeys(WORKER_COUNTERS, 0)
    self._closed = threading.Event()
    self._thread: threading.Thread | None = None
    self.last_error: str | None = None
    """why the last refresh attempt failed; None once one succeeds"""

  # -- lifecycle

  def start(self, *, warmup: bool = True) -> "SoapCache":
    """Starts the worker; with warmup, first compiles the request and write paths for every
    bucket up to max_batch so that no compile happens under load."""
    if self._thread is not None:
      raise RuntimeError("SoapCache already started")
    if warmup:
      self.warmup(range(self.config.max_batch + 1))
    self._thread = threading.Thread(target=self._run, name="soap-worker", daemon=True)
    self._thread.start()
    return self

  def warmup(self, batch_sizes) -> None:
    """Compiles `latest` and `write` for the buckets of these batch sizes (all rows masked out:
    the state does not change)."""
    dim = self.cache_config.dim
    for size in sorted({bucket(n, self.config.min_bucket) for n in batch_sizes}):
      keys, _ = _padded_keys(np.zeros(0, np.int64), size)
      off = jnp.zeros((size,), bool)
      with self._lock:
        self._state, _ = ercache.latest(self._state, keys, 0, off)
        self._state = ercache.write(self._state, keys, jnp.zeros((size, dim), jnp.float32), 0,
                                    self._version, off)

  def close(self, *, drain: bool = True, timeout: float | None = None) -> bool:
    """Stops taking refreshes. With drain, the worker finishes every queued refresh first; without,
    they are discarded (counted as dropped). Returns whether the worker stopped within timeout."""
    self._closed.set()
    if not drain:
      self._discard()
    if self._thread is not None:
      self._thread.join(timeout)
      if self._thread.is_alive():
        return False
    self._discard()  # a request that raced with close() after the worker left
    return True

  def _discard(self) -> None:
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return
      self._done(refresh_dropped=1)

  def __enter__(self) -> "SoapCache":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close(drain=True)

  # -- request path

  def serve(self, user_ids, now: int | None = None) -> Served:
    """Embeddings for int64 user ids [B] (host), at once: rows are DIRECT, FAILOVER (stale; a
    refresh is queued) or FALLBACK (nothing cached; a refresh is queued). Device arrays [B, ...]."""
    ids = np.asarray(user_ids, np.int64).reshape(-1)
    b = ids.shape[0]
    now = self._clock() if now is None else now
    keys, valid = _padded_keys(ids, bucket(b, self.config.min_bucket))
    with self._lock:
      self._state, served = ercache.latest(self._state, keys, now, valid)
    self._enqueue(ids, served.source)
    return jax.tree.map(lambda x: x[:b], served)

  def transact(self, fn: Callable[[ERCacheState], tuple[ERCacheState, Any]]) -> Any:
    """Applies `fn(state) -> (state, out)` under the lock and returns out: for a server that
    reads the cache inside its own compiled step (pair it with `enqueue`)."""
    with self._lock:
      self._state, out = fn(self._state)
    return out

  def enqueue(self, user_ids, source: jax.Array) -> None:
    """Queues a refresh for the rows of int64 user ids [B] whose `source` [>= B] is not DIRECT."""
    self._enqueue(np.asarray(user_ids, np.int64).reshape(-1), source)

  def _enqueue(self, ids: np.ndarray, source: jax.Array) -> None:
    if self._closed.is_set():
      self._count(refresh_dropped=1)
      return
    with self._idle:
      self._pending += 1
    try:
      self._queue.put_nowait((ids, source))  # the worker reads `source` back, not the request
      self._count(refresh_enqueued=1)
    except queue.Full:
      self._done(refresh_dropped=1)
      return
    if self._closed.is_set() and (self._thread is None or not self._thread.is_alive()):
      self._discard()  # close() ended between the check above and the put: nobody would take it

  # -- worker

  def _run(self) -> None:
    while True:
      items = self._take()
      if items is None:
        return
      try:
        self._refresh(items)
      except Exception as e:  # never let the worker die; the failover tier covers
        log.exception("SOAP refresh failed")
        self.last_error = repr(e)
      finally:
        for _ in items:
          self._done()

  def _take(self) -> list | None:
    """Up to max_batch users' worth of queued requests; None once closed and drained."""
    while True:
      try:
        items = [self._queue.get(timeout=0.02)]
        break
      except queue.Empty:
        if self._closed.is_set() and self._queue.empty():
          return None
    rows = items[0][0].shape[0]
    deadline = time.monotonic() + self.config.max_wait_s
    while rows < self.config.max_batch:
      try:
        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
      except queue.Empty:
        break
      items.append(item)
      rows += item[0].shape[0]
    return items

  def _refresh(self, items: list) -> None:
    ids = np.concatenate([ids[np.asarray(source)[:ids.shape[0]] != Source.DIRECT] for ids, source in items])
    _, first = np.unique(ids, return_index=True)
    unique = ids[np.sort(first)]
    self._count(refresh_requested=ids.shape[0], refresh_skipped=ids.shape[0] - unique.shape[0])
    for start in range(0, unique.shape[0], self.config.max_batch):
      self._refresh_batch(unique[start:start + self.config.max_batch])

  def _refresh_batch(self, ids: np.ndarray) -> None:
    size = bucket(ids.shape[0], self.config.min_bucket)
    keys, _ = _padded_keys(ids, size)
    with self._lock:  # the request path donates the state: read it only under the lock
      fresh = ercache.direct_fresh(self._state, keys, self._clock())
    fresh = np.asarray(fresh)[:ids.shape[0]]
    self._count(refresh_skipped=int(fresh.sum()))
    ids = ids[~fresh]
    if ids.shape[0] == 0:
      return
    with self._lock:
      user_model, version = self._user_model, self._version
    n, dim = ids.shape[0], self.cache_config.dim
    size = bucket(n, self.config.min_bucket)
    self._count(refresh_batches=1)
    try:  # the model sees bucket shapes only: ids padded by repeating the last one
      emb = jnp.asarray(user_model(np.pad(ids, (0, size - n), mode="edge")))
      if emb.shape != (size, dim):
        raise ValueError(f"user model returned {emb.shape} for {size} ids, want [{size}, {dim}]")
    except Exception as e:
      log.warning("user model failed on %d users: %r", n, e)
      self.last_error = repr(e)
      self._count(refresh_failures=n, refresh_failed_batches=1)
      return
    keys, valid = _padded_keys(ids, size)
    # a NaN / inf or far out-of-range embedding (a request's extreme user features) would be served
    # to every later request of that user until it expires: those users are not written, as if the
    # call had failed for them
    ok = usable(emb, self.config.max_abs)
    bad = int((~ok[:n]).sum())
    if bad:
      log.warning("user model returned %d of %d embeddings non-finite or beyond |%g|; not cached", bad, n,
                  self.config.max_abs)
      self.last_error = (f"embeddings non-finite or beyond |{self.config.max_abs:g}| for users "
                         f"{ids[~ok[:n]][:8].tolist()}")
      self._count(refresh_failures=bad)
      valid = jnp.asarray(np.asarray(valid) & ok)
    with self._lock:
      self._state = ercache.write(self._state, keys, emb, self._clock(), version, valid)
    self._count(refresh_written=n - bad)
    if not bad:
      self.last_error = None  # `last_error` describes the last attempt: this one succeeded

  # -- bookkeeping

  def _count(self, **add: int) -> None:
    with self._idle:
      for k, v in add.items():
        self._counters[k] += v

  def _done(self, **add: int) -> None:
    with self._idle:
      for k, v in add.items():
        self._counters[k] += v
      self._pending -= 1
      self._idle.notify_all()

  def wait_idle(self, timeout: float | None = None) -> bool:
    """Blocks until every queued refresh is written (or failed); False on timeout. For tests and
    offline replay, never the request path."""
    with self._idle:
      return self._idle.wait_for(lambda: self._pending == 0, timeout)

  # -- state, model, metrics

  @property
  def state(self) -> ERCacheState:
    """The current state. Every cache call donates it, so it is dead after the next serve or
    write: to compute with it, use `transact`."""
    return self._state

  def set_user_model(self, user_model: UserModel, version: int) -> None:
    """Hot-swaps the user model: refreshes from now on call it and are tagged `version`."""
    with self._lock:
      self._user_model, self._version = user_model, version

  def counters(self) -> dict[str, int]:
    """Cache counters (`ercache.COUNTERS`) and worker counters (`WORKER_COUNTERS`); reads the device."""
    with self._lock:
      cache = jax.tree.map(jnp.copy, self._state.counters)  # a copy outlives the next donation
    with self._idle:
      out = dict(self._counters)
    out["refresh_queued"] = self._queue.qsize()
    return {**ercache.counter_values(cache), **out}


__all__ = ["SoapCache", "SoapConfig", "UserModel", "WORKER_COUNTERS", "bucket"]
