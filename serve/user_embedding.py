"""User embeddings on the request path: a SUM user model, its ERCache and SOAP refresh, for one ranker.

A ranker trained with `--data.user_model DIR` reads K D dense features `user_emb_*`: the frozen
user tower's (standardised) embedding of the request's user. The engine fills them; `UserEmbeddings`
holds what it needs:

- the tower (`TowerEmbedder`): parameters on device and its standardised forward compiled ahead of
  time for every refresh batch size (powers of two up to `UserCacheConfig.refresh_batch`);
- the cache (`jaxrec.cache.soap.SoapCache` over an `ERCacheState` sized and timed by
  `UserCacheConfig`): direct tier, failover tier with the stabilization ring of the last m
  embeddings, default embedding zeros (the standardised mean);
- the users' latest tower features (host, the `max_users_kept` most recently refreshed users),
  which the refresh worker reads to run the tower.

The engine's compiled bucket step (`make_sum_step`) runs, in one program over (cache state, ranker
state, batch): `ercache.latest` for the batch's requests [R] -> broadcast each request's embedding
to its candidate rows -> the ranker -> scores, plus source / age / version per request. It runs
inside `SoapCache.transact` (the cache state is donated and replaced). Afterwards (`refresh`)
requests not served DIRECT store their user features and are handed to the SOAP worker, which
computes fresh embeddings off the request path and writes them back: the request path never waits
for the user model (SOAP). Times are integer seconds of `clock()` (monotone; injectable for tests).

`UserCacheConfig.mode = "sync"` is ERCache's synchronous path instead (`make_sync_steps`): per
bucket, one compiled `ercache.lookup` (a direct-tier hit skips the user model), then, if some
request missed, the tower over the batch's user rows on a helper thread awaited at most
`sync_deadline_ms`, then one compiled `ercache.resolve_after_inference` + ranker: FRESH where the
tower answered in time, else the failover tier (FAILOVER) or the default (FALLBACK). The only
extra transfers are the lookup's sources [B] out and the success mask [B] in.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
from pathlib import Path
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrec.cache import ercache
from jaxrec.cache.ercache import ERCacheConfig, ERCacheState, Source
from jaxrec.cache.hash_table import split_keys
from jaxrec.cache.soap import SoapCache, SoapConfig, bucket, usable
from jaxrec.data.batch import Batch, Schema
from jaxrec.training.state import merge_model
from jaxrec.training.user_model import FrozenUserTower, load_user_model
from serve.request import Rows, concat_rows, empty_rows
from serve.scoring import ranker_probs

log = logging.getLogger(__name__)

SOURCE_NAMES = {Source.DIRECT: "direct", Source.FRESH: "fresh", Source.FAILOVER: "failover",
                Source.FALLBACK: "fallback", Source.NEEDS_INFERENCE: "needs_inference"}
EMB_PREFIX = "user_emb_"
MAX_WAIT_MS = 60_000.0
"""the longest batching wait or deadline a server config takes (ms): a batcher or refresh worker waits
no longer than one minute for anything"""


@dataclasses.dataclass(frozen=True)
class UserCacheConfig:
  """The cache and refresh of one ranker's user model (see `jaxrec.cache.ercache.ERCacheConfig`)."""

  direct_ttl_s: int = 60
  """serve a cached embedding (DIRECT, no refresh) while younger than this"""
  failover_ttl_s: int = 86_400
  """past the direct TTL, serve the stale stabilized embedding (FAILOVER, refresh queued) while the
  newest write is younger than this; beyond, the default embedding (FALLBACK)"""
  direct_capacity: int = 1 << 16
  """direct-tier slots (users)"""
  failover_capacity: int = 1 << 18
  """failover-tier slots (users); >= direct_capacity"""
  stabilize_m: int = 1
  """served embedding = mean of the user's last m embeddings written"""
  refresh_batch: int = 256
  """most users per user-model call of the refresh worker"""
  refresh_wait_ms: float = 2.0
  """how long the refresh worker waits to fill a batch"""
  refresh_queue: int = 1024
  """batches of refreshes waiting for the worker; beyond, refreshes are dropped (and retried on the
  user's next request)"""
  max_users_kept: int = 1 << 16
  """users whose latest tower features are kept on the host for the refresh worker"""
  mode: Literal["soap", "sync"] = "soap"
  """soap: the request path never waits for the user model (stale or default embedding, refreshed
  in the background); sync: a direct-tier hit skips the user model, a miss runs it for the
  request within sync_deadline_ms (FRESH), and on failure or timeout serves the failover tier
  (FAILOVER), else the default embedding (FALLBACK)"""
  sync_deadline_ms: float = 50.0
  """sync mode: how long a batch waits for the user model (one tower thread per user model, shared
  by its rankers: a call that started runs to its end, so a tower slower than this also delays the
  next batch's call; both count as sync_timeouts)"""
  max_abs_embedding: float = 100.0
  """the tower's embeddings are standardised per dimension (mean 0, std 1 on training rows): one
  with a value beyond this many standard deviations (or NaN / inf), which only user features far
  outside the training data give, is neither cached nor served; the request gets the failover or
  default embedding, as when the user model fails (a default `train.user_model` run: |value| at most
  4.36 over 1.33M eval-stream requests of all its 1,000 users, 2026-12-07, docs/BENCHMARKS.md)"""

  def __post_init__(self):  # checked here, not only when a SUM ranker is served, and named as the flags are
    for name in ("direct_capacity", "failover_capacity", "stabilize_m", "refresh_batch", "refresh_queue",
                 "max_users_kept"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.direct_ttl_s <= self.failover_ttl_s:
      raise ValueError(f"need 0 <= direct_ttl_s <= failover_ttl_s, got {self.direct_ttl_s} and {self.failover_ttl_s}")
    if self.failover_capacity < self.direct_capacity:
      raise ValueError(f"failover_capacity ({self.failover_capacity}) must be >= direct_capacity "
                       f"({self.direct_capacity}): the failover tier keeps every user the direct tier does")
    if self.mode not in ("soap", "sync"):
      raise ValueError(f"mode must be 'soap' or 'sync', got {self.mode!r}")
    if not 0 <= self.refresh_wait_ms <= MAX_WAIT_MS:
      raise ValueError(f"refresh_wait_ms must be in [0, {MAX_WAIT_MS}], got {self.refresh_wait_ms}")
    if not 0 < self.sync_deadline_ms <= MAX_WAIT_MS:
      raise ValueError(f"sync_deadline_ms must be in (0, {MAX_WAIT_MS}], got {self.sync_deadline_ms}")
    if not self.max_abs_embedding > 0:
      raise ValueError(f"max_abs_embedding must be > 0, got {self.max_abs_embedding}")

  def ercache(self, dim: int) -> ERCacheConfig:
    """The ERCacheConfig of a user model with `dim`-wide embeddings."""
    return ERCacheConfig(dim=dim, direct_ttl_s=self.direct_ttl_s, failover_ttl_s=self.failover_ttl_s,
                         direct_capacity=self.direct_capacity, failover_capacity=self.failover_capacity,
                         stabilize_m=self.stabilize_m)

  def soap(self) -> SoapConfig:
    """The SoapConfig of the refresh worker."""
    return SoapConfig(max_batch=self.refresh_batch, max_wait_s=self.refresh_wait_ms / 1e3,
                      queue_size=self.refresh_queue, max_abs=self.max_abs_embedding)


def embedding_columns(schema: Schema) -> np.ndarray:
  """i32 [K D]: the positions of user_emb_0 .. user_emb_{KD-1} in the ranker's dense features (empty if none)."""
  names = [n for n in schema.dense if n.startswith(EMB_PREFIX)]
  return np.asarray([schema.dense.index(f"{EMB_PREFIX}{i}") for i in range(len(names))], np.int32)


def user_model_dir(ranker_workdir: Path, configured: str) -> Path:
  """The user model's workdir named by a ranker's data.user_model: as written if it exists (relative
  to the current directory), else relative to the ranker's workdir."""
  path = Path(configured)
  if path.is_absolute() or path.exists():
    return path
  return Path(ranker_workdir) / path


class TowerEmbedder:
  """A frozen user tower on one device: `embed(rows [P]) -> f32 [P, K D]` standardised, compiled
  ahead of time for each P in `sizes`."""

  def __init__(self, tower: FrozenUserTower, sizes: list[int], device: jax.Device):
    self.tower, self.device = tower, device
    self.schema = tower.schema
    model = tower.config.model
    self.features = frozenset(model.user_sparse) | frozenset(model.user_dense)
    self.dim = tower.out_features
    self._args = jax.device_put((tower.params, tower.table, tower.mean, tower.std), device)
    graphdef: nnx.GraphDef = tower.graphdef

    def embed(params, table, mean, std, dense, sparse, sparse_mask):
      batch = Batch(dense=dense, sparse=sparse, sparse_mask=sparse_mask, labels=None, weights=None,
                    domain=None, timestamp=None)
      raw = merge_model(graphdef, params, table).user_embedding(batch).astype(jnp.float32)
      return (raw - mean) / std

    s = self.schema
    self._compiled = {}
    for p in sorted(set(sizes)):
      shapes = (jax.ShapeDtypeStruct((p, s.num_dense), jnp.float32),
                jax.ShapeDtypeStruct((p, s.num_sparse, s.max_len), jnp.int32),
                jax.ShapeDtypeStruct((p, s.num_sparse, s.max_len), jnp.bool_))
      self._compiled[p] = jax.jit(embed).lower(*self._args, *shapes).compile()
      jax.block_until_ready(self.embed(empty_rows(p, s)))  # warm-up

  @property
  def version(self) -> int:
    return self.tower.step

  def embed(self, rows: Rows) -> jax.Array:
    """f32 [P, K D] on device: the standardised embeddings of P rows (P one of the compiled sizes)."""
    args = jax.device_put((rows.dense, rows.sparse, rows.sparse_mask), self.device)
    return self._compiled[rows.num_rows](*self._args, *args)


def _rank(graphdef: nnx.GraphDef, schema: Schema, cols: jax.Array, state, embedding, row_req, dense, sparse,
          sparse_mask) -> jax.Array:
  """probs f32 [B, T] of the ranker with each row's user_emb columns set to its request's embedding."""
  dense = dense.at[:, cols].set(embedding.astype(jnp.float32)[row_req])
  return ranker_probs(graphdef, schema, state, dense, sparse, sparse_mask)


def make_sum_step(graphdef: nnx.GraphDef, schema: Schema, emb_cols: np.ndarray):
  """step(cache, state, hi, lo, valid, now, row_req, dense, sparse, sparse_mask) ->
  (cache, (probs f32 [B, T], source i32 [B], age i32 [B], version i32 [B])), jitted, cache donated.

  The SOAP step: `ercache.latest` (never waits), then the ranker. hi, lo u32 [B] and valid bool
  [B]: the batch's requests' user keys (request i in slot i, valid marks the real ones); row_req i32
  [B]: the request of each row; dense [B, Fd] with the user_emb columns (`emb_cols`) left 0: the
  step fills them with the request's served embedding.
  """
  cols = jnp.asarray(emb_cols)

  def step(cache: ERCacheState, state, hi, lo, valid, now, row_req, dense, sparse, sparse_mask):
    cache, served = ercache.latest(cache, (hi, lo), now, valid)
    probs = _rank(graphdef, schema, cols, state, served.embedding, row_req, dense, sparse, sparse_mask)
    return cache, (probs, served.source, served.age, served.version)

  return jax.jit(step, donate_argnums=0)


def make_sync_steps(graphdef: nnx.GraphDef, schema: Schema, emb_cols: np.ndarray):
  """The two jitted steps of sync mode (cache donated), around the user model run between them:

      lookup(cache, hi, lo, valid, now) -> (cache, Served [B])        DIRECT or NEEDS_INFERENCE
      resolve(cache, state, hi, lo, valid, now, looked_up, embeddings [B, D], ok bool [B], version,
              row_req, dense, sparse, sparse_mask) -> (cache, (probs, source, age, version))

  resolve writes and serves the NEEDS_INFERENCE requests' embeddings where ok (FRESH), the failover
  tier or the default where not, then runs the ranker (arguments as in `make_sum_step`).
  """
  cols = jnp.asarray(emb_cols)

  def lookup(cache: ERCacheState, hi, lo, valid, now):
    return ercache.lookup(cache, (hi, lo), now, valid)

  def resolve(cache: ERCacheState, state, hi, lo, valid, now, looked_up, embeddings, ok, version, row_req, dense,
              sparse, sparse_mask):
    cache, served = ercache.resolve_after_inference(cache, (hi, lo), now, looked_up, embeddings, ok, version, valid)
    probs = _rank(graphdef, schema, cols, state, served.embedding, row_req, dense, sparse, sparse_mask)
    return cache, (probs, served.source, served.age, served.version)

  return jax.jit(lookup, donate_argnums=0), jax.jit(resolve, donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class SyncStep:
  """Sync mode's compiled steps for one bucket (`make_sync_steps`) and a zero embedding block
  [B, D] on device (passed when no request needs the user model)."""

  lookup: jax.stages.Compiled
  resolve: jax.stages.Compiled
  zeros: jax.Array


def _keys(user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(hi, lo) u32 halves of int64 ids, on the host (`hash_table.split_keys` without the transfer)."""
  k = np.asarray(user_ids, np.int64).view(np.uint64)
  return (k >> 32).astype(np.uint32), (k & 0xFFFFFFFF).astype(np.uint32)


class UserEmbeddings:
  """One user model on the request path: tower, cache, refresh worker (module docstring).

  Shared by every ranker served that consumes this user model (SUM: a few user models, many
  downstream rankers): one cache and one refresh per user, whichever ranker's request triggered it.
  Each engine holding it calls `check_ranker` once, `start` when it starts and `close` when it
  closes; the worker starts with the first holder and stops with the last.
  """

  def __init__(self, tower: FrozenUserTower, cfg: UserCacheConfig, ranker_schema: Schema, device: jax.Device,
               clock: Callable[[], int], buckets: tuple[int, ...] = ()):
    self.cfg, self.device, self.clock = cfg, device, clock
    self.check_ranker(ranker_schema, tower)
    self._soap_cfg = cfg.soap()
    self._sizes = sorted({bucket(n, self._soap_cfg.min_bucket) for n in range(1, cfg.refresh_batch + 1)})
    # sync mode runs the tower over a whole bucket's requests (`buckets`: the engine's)
    self._tower_sizes = self._sizes + (list(buckets) if cfg.mode == "sync" else [])
    self.embedder = TowerEmbedder(tower, self._tower_sizes, device)
    # committed to the device, as the compiled step's outputs are (so the worker's jitted calls
    # see one argument signature and compile once, at start)
    cache = jax.device_put(ERCacheState.create(cfg.ercache(tower.out_features)), device)
    self.soap = SoapCache(cache, functools.partial(self._user_model, self.embedder), self._soap_cfg,
                          version=tower.step, clock=clock)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="user-tower")  # sync mode
    self._sync_counts = {"sync_inferences": 0, "sync_timeouts": 0, "sync_errors": 0, "sync_unusable": 0}
    self._features: collections.OrderedDict[int, Rows] = collections.OrderedDict()
    self._features_lock = threading.Lock()
    self._sources = dict.fromkeys(("direct", "fresh", "failover", "fallback"), 0)
    self._sources_lock = threading.Lock()

    self._holders = 0
    self._holders_lock = threading.Lock()

  @staticmethod
  def check_ranker(ranker_schema: Schema, tower: FrozenUserTower) -> None:
    """ValueError unless the ranker reads exactly the tower's embedding width as user_emb_* features."""
    n = embedding_columns(ranker_schema).size
    if n != tower.out_features:
      raise ValueError(f"the ranker reads {n} user_emb_* features, the user model "
                       f"{str(tower.workdir)!r} makes {tower.out_features}")

  @staticmethod
  def server_filled(ranker_schema: Schema) -> frozenset[str]:
    """The ranker's dense features this service fills (user_emb_*): a client must not send them."""
    return frozenset(ranker_schema.dense[i] for i in embedding_columns(ranker_schema))

  @property
  def holders(self) -> int:
    """Engines that started and have not closed it."""
    with self._holders_lock:
      return self._holders

  @property
  def features(self) -> frozenset[str]:
    """The tower's features a request carries in `features`."""
    return self.embedder.features

  @property
  def version(self) -> int:
    return self.embedder.version

  def start(self) -> None:
    """The first holder's call compiles the cache's paths (the tower was compiled on construction)
    and starts the worker; later holders' calls only count them."""
    with self._holders_lock:
      self._holders += 1
      if self._holders > 1:
        return
      try:
        self._start()
      except BaseException:  # nobody holds a half-started cache: its worker must not run on
        self._holders -= 1
        self.soap.close(drain=False, timeout=5.0)
        raise

  def _start(self) -> None:
    self.soap.start(warmup=True)
    for size in self._sizes:  # the worker's calls with its argument types, so nothing compiles under load
      keys, off = split_keys(np.zeros(size, np.int64)), jnp.asarray(np.zeros(size, bool))  # as the worker's
      emb = self.embedder.embed(empty_rows(size, self.embedder.schema))  # committed to the device, as the worker's
      self.soap.transact(lambda st: (st, ercache.direct_fresh(st, keys, 0)))
      self.soap.transact(lambda st: (ercache.write(st, keys, emb, 0, self.version, off), None))
    self.soap.counters()  # compiles the counters' copy

  def close(self, drain: bool = True, timeout: float | None = None) -> None:
    """The last holder's call stops the refresh worker (drain: after the queued refreshes)."""
    with self._holders_lock:
      self._holders -= 1
      if self._holders > 0:
        return
    self.soap.close(drain=drain, timeout=timeout)
    self._pool.shutdown(wait=False)

  def set_tower(self, tower: FrozenUserTower) -> None:
    """Hot-swaps the user model: compiles it for every batch size here, then refreshes (and sync
    mode's inferences) use it."""
    self.use_embedder(self.prepare_tower(tower))

  def prepare_tower(self, tower: FrozenUserTower) -> "TowerEmbedder":
    """A new user model checked against the served one and compiled for every batch size here;
    nothing is swapped until `use_embedder` (ValueError if it cannot replace the served one)."""
    if tower.out_features != self.embedder.dim:
      raise ValueError(f"the new user model makes {tower.out_features}-wide embeddings, the served one "
                       f"{self.embedder.dim}")
    model = tower.config.model
    if tower.schema != self.embedder.schema or set(model.user_sparse) | set(model.user_dense) != self.features:
      raise ValueError("the new user model reads other features (or another schema) than the served one; "
                       "start a new engine for it")
    return TowerEmbedder(tower, self._tower_sizes, self.device)

  def use_embedder(self, embedder: "TowerEmbedder") -> None:
    """Refreshes (and sync mode's inferences) use `embedder` (from `prepare_tower`) from now on."""
    self.soap.set_user_model(functools.partial(self._user_model, embedder), embedder.tower.step)
    self.embedder = embedder

  # ---- the compiled step

  def compile_step(self, graphdef: nnx.GraphDef, schema: Schema, state, b: int) -> jax.stages.Compiled | SyncStep:
    """The bucket step for b rows (and b requests at most): `make_sum_step` compiled (soap mode),
    or `make_sync_steps` compiled (sync mode)."""
    def sds(shape, dtype):
      return jax.ShapeDtypeStruct(shape, dtype)

    keys = (sds((b,), jnp.uint32), sds((b,), jnp.uint32), sds((b,), jnp.bool_), sds((), jnp.int32))
    rows = (sds((b,), jnp.int32), sds((b, schema.num_dense), jnp.float32),
            sds((b, schema.num_sparse, schema.max_len), jnp.int32), sds((b, schema.num_sparse, schema.max_len), jnp.bool_))
    cache = self.soap.transact(lambda st: (st, jax.tree.map(lambda x: sds(x.shape, x.dtype), st)))
    if self.cfg.mode == "soap":
      return make_sum_step(graphdef, schema, embedding_columns(schema)).lower(cache, state, *keys, *rows).compile()
    lookup, resolve = make_sync_steps(graphdef, schema, embedding_columns(schema))
    looked_up = jax.eval_shape(lookup, cache, *keys)[1]
    lookup = lookup.lower(cache, *keys).compile()
    dim = self.embedder.dim
    resolve = resolve.lower(cache, state, *keys, looked_up, sds((b, dim), jnp.float32), sds((b,), jnp.bool_),
                            sds((), jnp.int32), *rows).compile()
    return SyncStep(lookup, resolve, jax.device_put(np.zeros((b, dim), np.float32), self.device))

  def run(self, compiled: jax.stages.Compiled | SyncStep, state, rows: Rows, user_ids: list[int],
          counts: list[int], user_rows: list[Rows]):
    """Runs a compiled step over a batch: `rows` [B] (the requests' rows one after another, then
    padding), request i has user_ids[i], counts[i] rows and the tower row user_rows[i]. Returns
    device arrays (probs [B, T], source [B], age [B], version [B]); per-request outputs in the first
    len(user_ids) slots."""
    b = rows.num_rows
    ids = np.zeros(b, np.int64)
    ids[:len(user_ids)] = user_ids
    valid = np.zeros(b, bool)
    valid[:len(user_ids)] = True
    row_req = np.zeros(b, np.int32)
    row_req[:sum(counts)] = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    hi, lo = _keys(ids)
    keys = jax.device_put((hi, lo, valid, np.int32(self.clock())), self.device)
    batch = jax.device_put((row_req, rows.dense, rows.sparse, rows.sparse_mask), self.device)
    if isinstance(compiled, SyncStep):
      return self._run_sync(compiled, state, keys, batch, user_rows, b)
    with jax.transfer_guard("disallow"):  # nothing but the explicit transfers above
      return self.soap.transact(lambda cache: compiled(cache, state, *keys, *batch))

  def _run_sync(self, step: SyncStep, state, keys, batch, user_rows: list[Rows], b: int):
    """Sync mode: lookup; the user model over the requests (if any missed the direct tier) within
    the deadline; resolve and rank."""
    with jax.transfer_guard("disallow"):
      looked_up = self.soap.transact(lambda cache: step.lookup(cache, *keys))
    k = len(user_rows)
    need = np.asarray(jax.device_get(looked_up.source))[:k] == Source.NEEDS_INFERENCE
    emb, ok = step.zeros, np.zeros(b, bool)
    embedder = self.embedder
    if need.any():
      tower_rows = concat_rows(user_rows, embedder.schema, b)
      future = None
      try:
        future = self._pool.submit(lambda: jax.block_until_ready(embedder.embed(tower_rows)))
        emb = future.result(timeout=self.cfg.sync_deadline_ms / 1e3)
        good = usable(np.asarray(emb)[:k], self.cfg.max_abs_embedding)  # else never written, not served
        ok[:k] = need & good
        self._count(sync_inferences=1)
        unusable = int((need & ~good).sum())
        if unusable:
          self.soap.last_error = (f"embeddings non-finite or beyond |{self.cfg.max_abs_embedding:g}| for "
                                  f"{unusable} requests")
          self._count(sync_unusable=unusable)
        else:
          self.soap.last_error = None
      except concurrent.futures.TimeoutError:
        # not started (still behind an earlier slow call): dropped, so slow calls never pile up
        # behind one another and later batches wait only for their own
        future.cancel()
        self.soap.last_error = f"the user model missed its {self.cfg.sync_deadline_ms:g} ms deadline"
        self._count(sync_timeouts=1)
      except Exception as e:  # noqa: BLE001 - a failed user model serves the failover tier, never fails the batch
        log.warning("user model failed on %d requests: %r", int(need.sum()), e)
        self.soap.last_error = repr(e)
        self._count(sync_errors=1)
    extra = jax.device_put((ok, np.int32(embedder.version)), self.device)
    with jax.transfer_guard("disallow"):
      return self.soap.transact(lambda cache: step.resolve(cache, state, *keys, looked_up, emb, *extra, *batch))

  def _count(self, **add: int) -> None:
    with self._sources_lock:
      for name, v in add.items():
        self._sync_counts[name] += v

  def refresh(self, user_ids: list[int], user_rows: list[Rows], source: np.ndarray) -> list[str]:
    """After a batch: keeps the tower features of the users not served DIRECT and queues their
    refresh (never waits). Returns the source names of the requests."""
    names = [SOURCE_NAMES[Source(int(s))] for s in source]
    with self._sources_lock:
      for n in names:
        self._sources[n] = self._sources.get(n, 0) + 1
    stale = [i for i, s in enumerate(source) if s != Source.DIRECT]
    if stale and self.cfg.mode == "soap":
      with self._features_lock:
        for i in stale:
          self._features[user_ids[i]] = user_rows[i]
          self._features.move_to_end(user_ids[i])
        while len(self._features) > self.cfg.max_users_kept:
          self._features.popitem(last=False)
      self.soap.enqueue(np.asarray(user_ids, np.int64), np.asarray(source))
    return names

  def _user_model(self, embedder: TowerEmbedder, ids: np.ndarray) -> jax.Array:
    """The refresh worker's user model (bound to one embedder): ids int64 [P] -> f32 [P, K D], from
    the users' kept features. A user whose features were dropped (more than max_users_kept users
    waiting) gets a NaN row: not written (SoapCache counts it a refresh failure), while the others
    of the batch are; the user's next request keeps their features again."""
    with self._features_lock:
      kept = [self._features.get(int(i)) for i in ids]
    missing = np.array([r is None for r in kept])
    if missing.any():
      log.warning("no features kept for %d users (e.g. %s; more than max_users_kept=%d users waiting): not refreshed",
                  int(missing.sum()), [int(i) for i in ids[missing][:8]], self.cfg.max_users_kept)
      if missing.all():
        return np.full((len(ids), embedder.dim), np.nan, np.float32)
      stand_in = next(r for r in kept if r is not None)
      kept = [stand_in if r is None else r for r in kept]
    emb = embedder.embed(concat_rows(kept, embedder.schema, len(kept)))
    if missing.any():
      emb = np.where(missing[:, None], np.float32(np.nan), np.asarray(emb))
    return emb

  # ---- introspection

  def stats(self) -> dict:
    """{"mode", "sources": served-source counts, "cache": SoapCache.counters(), "users_kept": n,
    "last_error", and in sync mode "sync_inferences", "sync_timeouts", "sync_errors" (batches) and
    "sync_unusable" (requests whose embedding was non-finite or beyond max_abs_embedding)}."""
    with self._sources_lock:
      sources, sync = dict(self._sources), dict(self._sync_counts)
    with self._features_lock:
      kept = len(self._features)
    out = {"mode": self.cfg.mode, "sources": sources, "cache": self.soap.counters(), "users_kept": kept,
           "last_error": self.soap.last_error}
    return {**out, **sync} if self.cfg.mode == "sync" else out

  def describe(self) -> dict:
    """{"workdir", "version", "embedding_dim", "features": [the tower's request features], "dense": [those
    that are numbers], "sparse": [{"name", "vocab_size", "max_len"} of those that are ids], "cache":
    {config}, "rankers"}."""
    u = self.embedder.schema
    return {"workdir": str(self.embedder.tower.workdir), "version": self.version, "embedding_dim": self.embedder.dim,
            "features": sorted(self.features), "dense": [n for n in u.dense if n in self.features],
            "sparse": [{"name": f.name, "vocab_size": f.vocab_size, "max_len": f.max_len}
                       for f in u.sparse if f.name in self.features],
            "cache": dataclasses.asdict(self.cfg), "rankers": self.holders}


def load_user_embeddings(ranker_workdir: Path, configured: str, cfg: UserCacheConfig, ranker_schema: Schema,
                         device: jax.Device, clock: Callable[[], int], buckets: tuple[int, ...],
                         shared: dict | None = None) -> UserEmbeddings:
  """The user model a ranker's config names (data.user_model = `configured`), loaded and compiled
  (for the engine's row `buckets` too in sync mode). With `shared` (a dict the caller keeps across
  rankers, e.g. serve.registry's), rankers naming the same user model directory get one
  UserEmbeddings: one cache and one refresh per user. They must then configure its cache alike
  (ValueError otherwise)."""
  path = user_model_dir(ranker_workdir, configured)
  key = str(path.resolve())
  if shared is not None and key in shared:
    users, first_cfg, first_buckets, first_ranker = shared[key]
    if (first_cfg, first_buckets if cfg.mode == "sync" else ()) != (cfg, buckets if cfg.mode == "sync" else ()):
      raise ValueError(f"rankers {str(first_ranker)!r} and {str(ranker_workdir)!r} share user model {str(path)!r} "
                       "(one cache per user model) but configure its cache (or, in sync mode, the engine "
                       "buckets) differently; give both the same user_cache settings")
    users.check_ranker(ranker_schema, users.embedder.tower)
    return users
  users = UserEmbeddings(load_user_model(path), cfg, ranker_schema, device, clock, buckets)
  if shared is not None:
    shared[key] = (users, cfg, buckets, ranker_workdir)
  return users


__all__ = ["SOURCE_NAMES", "SyncStep", "TowerEmbedder", "UserCacheConfig", "UserEmbeddings", "embedding_columns",
           "load_user_embeddings", "make_sum_step", "make_sync_steps", "user_model_dir"]
