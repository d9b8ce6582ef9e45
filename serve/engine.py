"""The serving engine without HTTP: a trained ranker, dynamic batching, one compiled step per bucket.

    engine = open_engine(Path("runs/demo"), EngineConfig())   # or Engine(load_ranker(...), cfg)
    engine.start()                       # compiles every bucket; nothing compiles after this
    resp = engine.rank(RankRequest(features={"user_id": 7}, candidates=[{"ad_id": 1}, {"ad_id": 2}]))
    resp.scores["click"]                 # f32 [N], one probability per candidate
    engine.reload()                      # hot swap to the workdir's newest checkpoint, under load
    engine.close(drain=True)

`submit` validates on the caller's thread (RequestError) and queues the request on a bounded
queue (Overloaded when full). One worker thread takes requests off the queue until they hold
`max_rows` candidate rows or `max_wait_ms` has passed since the first, pads their rows to the
smallest bucket that holds them, runs that bucket's ahead-of-time compiled step
(lookup -> model -> sigmoid) and hands each request its own rows' scores. The only host-device
transfers of a batch are its inputs (explicit `device_put`) and its outputs; the step runs under
`jax.transfer_guard("disallow")`.

A ranker trained on a user model's embeddings (`--data.user_model`, dense features `user_emb_*`)
is opened with its user model (`serve.user_embedding`): requests must carry `user_id` (the cache
key) and the tower's user features; the step reads each request's embedding from the device
cache (SOAP: never waiting for the user model) and a background worker refreshes stale ones.
The response's `user_embedding` says which source served: direct, failover or fallback.

Hot swap (`swap`, `reload`): the new checkpoint is compiled and warmed for every bucket on the
caller's thread while the worker keeps serving, then replaces the served one between two batches
(one reference assignment), so no request fails and each is scored wholly by one version;
`reload` also swaps in the user model's newest checkpoint, compiled first and switched with the
ranker (refreshes use it from then on, and the cache's stabilization averages the versions); rankers
that share a user model reload together (`reload_together`, `Registry.reload`). Another schema or
graph raises SwapError and the old checkpoint stays.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrec.data.batch import Schema
from jaxrec.layers.dense import prequantize_fp8_weights
from jaxrec.training import sharding
from jaxrec.training.loop import RankerConfig
from jaxrec.training.restore import read_run, restore_ranker
from jaxrec.training.state import merge_state, split_model
from jaxrec.training.user_model import load_user_model
from serve.request import EncodedRequest, RankRequest, RequestEncoder, RequestError, Rows, concat_rows
from serve.scoring import ranker_probs
from serve.user_embedding import MAX_WAIT_MS, UserCacheConfig, UserEmbeddings, embedding_columns, load_user_embeddings

__all__ = ["Engine", "EngineClosed", "EngineConfig", "LoadedRanker", "Overloaded", "RankResponse",
           "RequestError", "SwapError", "UserEmbeddingInfo", "load_ranker", "open_engine", "reload_together"]

CONTEXT_FEATURES = frozenset({"user_id", "user_segment", "user_activity", "device", "hour", "hour_sin",
                              "hour_cos", "domain", "placement"})
"""request-level (user and context) features of the ads world; the rest describe an ad"""


class Overloaded(RuntimeError):
  """The request queue is full (HTTP 503)."""


class EngineClosed(RuntimeError):
  """The engine is closed, or closed without draining before this request ran."""


class SwapError(RuntimeError):
  """A new checkpoint cannot replace the served one (another schema or graph); the old one stays."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  buckets: tuple[int, ...] = (64, 256, 1024, 4096)
  """row counts of the compiled steps; a batch is padded to the smallest that holds it"""
  max_rows: int = 4096
  """most candidate rows in one batch (<= the largest bucket)"""
  max_wait_ms: float = 2.0
  """how long the first request of a batch waits for others to join it"""
  max_queue: int = 256
  """requests waiting at most; `submit` raises Overloaded beyond"""
  max_candidates: int = 1024
  """most candidates in one request (<= max_rows)"""
  user_cache: UserCacheConfig = UserCacheConfig()
  """the user-embedding cache and its refresh, for a ranker that consumes a user model"""

  def __post_init__(self):
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
      raise ValueError(f"buckets must be positive and strictly increasing, got {self.buckets}")
    if not 1 <= self.max_candidates <= self.max_rows <= self.buckets[-1]:
      raise ValueError(f"need 1 <= max_candidates ({self.max_candidates}) <= max_rows ({self.max_rows}) "
                       f"<= largest bucket ({self.buckets[-1]})")
    if not 0 <= self.max_wait_ms <= MAX_WAIT_MS or self.max_queue < 1:
      raise ValueError(f"need 0 <= max_wait_ms <= {MAX_WAIT_MS} and max_queue >= 1, got {self.max_wait_ms} "
                       f"and {self.max_queue}")

  def bucket_for(self, rows: int) -> int:
    return next(b for b in self.buckets if b >= rows)


@struct.dataclass
class ServingState:
  """What the serving step reads, on device: dense parameters (with every FP8 forward weight
  already quantized, `Dense.prequantize`), the embedding table, and the amax histories of
  fp8_delayed sites ({} when none)."""

  params: dict
  table: jax.Array
  fp8: dict = struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoadedRanker:
  schema: Schema
  graphdef: nnx.GraphDef
  state: ServingState
  version: int
  """the checkpoint step"""
  workdir: Path | None = None
  """the training run it came from (what `Engine.reload` reloads)"""
  config: RankerConfig | None = None
  """the run's config (data.user_model names the user model it consumes)"""


@dataclasses.dataclass(frozen=True)
class UserEmbeddingInfo:
  """Which user embedding a request was served (rankers that consume a user model)."""

  source: str
  """"direct" (cached, younger than the direct TTL), "fresh", "failover" (stale, a refresh is
  queued) or "fallback" (nothing cached: the model's default embedding)"""
  age_s: int
  """seconds since the served embedding was written (-1 for fallback)"""
  version: int
  """the user-model version (checkpoint step) that wrote it (-1 for fallback)"""


@dataclasses.dataclass(frozen=True)
class RankResponse:
  scores: dict[str, np.ndarray]
  """{objective: f32 [N]} probability per candidate, in the request's candidate order"""
  model_version: int
  user_embedding: UserEmbeddingInfo | None = None
  """None for a ranker that consumes no user model"""


def load_ranker(workdir: Path, step: int | None = None) -> LoadedRanker:
  """The ranker a training run (jaxrec.training.loop.train_and_evaluate) left in `workdir`.

  Rebuilds the model from config.json and schema.json and restores the checkpoint at `step`
  (default the latest) onto one device, the way train.probe.load_run does. FP8 forward weights are
  quantized once here (`Dense.prequantize`), and fp8_tensor sites scale their inputs per row, so
  that a request's scores never depend on the requests batched with it.
  """
  workdir = Path(workdir)
  cfg, schema = read_run(workdir)
  # the table's rows were padded to a multiple of the training devices
  graphdef, state, _ = restore_ranker(cfg, schema, workdir, sharding.make_mesh(1),
                                      row_multiple=cfg.train.num_devices or jax.local_device_count(), step=step)
  # a ranker trained under an FP8 plan serves with its FP8 weights quantized once, here, not per batch;
  # fp8_tensor sites scale their inputs per row: one amax over the batch would make a request's
  # scores depend on the other requests (and padding) batched with it
  model = merge_state(graphdef, state)
  if prequantize_fp8_weights(model, rowwise_inputs=True):
    graphdef, params, table, fp8 = split_model(model)
  else:
    params, table, fp8 = state.params, state.table, state.fp8
  return LoadedRanker(schema=schema, graphdef=graphdef, state=ServingState(params=params, table=table, fp8=fp8),
                      version=int(state.step), workdir=workdir, config=cfg)


def make_score_step(graphdef: nnx.GraphDef, schema: Schema):
  """score(state, dense [B, Fd], sparse [B, Fs, L], sparse_mask) -> probabilities f32 [B, T]."""

  def score(state: ServingState, dense: jax.Array, sparse: jax.Array, sparse_mask: jax.Array) -> jax.Array:
    return ranker_probs(graphdef, schema, state, dense, sparse, sparse_mask)

  return jax.jit(score)


@dataclasses.dataclass
class _Pending:
  rows: Rows
  future: concurrent.futures.Future
  user_id: int | None = None
  user_row: Rows | None = None
  """the user tower's row [1] (rankers that consume a user model)"""


@dataclasses.dataclass(frozen=True, eq=False)
class _Active:
  """What a batch runs: the ranker, its state on device and its compiled step per bucket. Replaced
  as a whole by `Engine.swap`; the worker reads it once per batch."""

  ranker: LoadedRanker
  state: ServingState
  compiled: dict[int, jax.stages.Compiled]


def _abstract(tree) -> object:
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def _batch_bins(n: int) -> str:
  """The histogram bin of a batch of n requests: "1", "2", "4", ... (the power of two >= n)."""
  return str(1 << (max(n, 1) - 1).bit_length())


class Engine:
  """Dynamic batching over one loaded ranker; see the module docstring."""

  def __init__(self, ranker: LoadedRanker, cfg: EngineConfig = EngineConfig(), *,
               users: UserEmbeddings | None = None):
    self.cfg = cfg
    self.schema = ranker.schema
    self.device = jax.local_devices()[0]
    if users is None and embedding_columns(ranker.schema).size:
      raise ValueError("this ranker reads a user model's embeddings (user_emb_* features): open it with "
                       "open_engine(workdir), which loads the user model and its cache")
    self.users = users
    """the user model, its cache and refresh worker (shared with other engines of its user model);
    None for a ranker that consumes none"""
    self._server_filled = frozenset() if users is None else users.server_filled(ranker.schema)
    self._encoder = self.encoder()
    self._holds_users = False  # between start and close: this engine is one of the user model's holders
    self._active = self._prepare(ranker, compile_steps=False)
    self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=cfg.max_queue)
    self._lock = threading.Lock()
    self._swap_lock = threading.RLock()  # one swap or reload at a time
    self._stats_lock = threading.Lock()
    self._closed = False
    self._close_args: tuple[bool, float | None] = (False, None)  # (drain, timeout) of the last close()
    self._stop = threading.Event()
    self._drain = True
    self._worker: threading.Thread | None = None
    self.batches_run: dict[int, int] = {b: 0 for b in cfg.buckets}
    """how many batches each bucket has run"""
    self._counts = {"requests": 0, "rows": 0, "failed_batches": 0, "failed_requests": 0, "swaps": 0,
                    "failed_swaps": 0}
    # every bin from the start (a batch holds at most max_rows requests): a histogram whose bins
    # appear over time gives wrong increases to a scraper
    self._batch_hist: dict[str, int] = {str(1 << i): 0 for i in range((cfg.max_rows - 1).bit_length() + 1)}

  @property
  def ranker(self) -> LoadedRanker:
    """The ranker now served (changes on `swap`)."""
    return self._active.ranker

  # ---- lifecycle

  def _prepare(self, ranker: LoadedRanker, compile_steps: bool = True) -> _Active:
    """The ranker's state on device and (compile_steps) its step compiled and run once per bucket."""
    state = jax.device_put(ranker.state, self.device)
    active = _Active(ranker, state, {})
    if not compile_steps:
      return active
    s, step = self.schema, make_score_step(ranker.graphdef, ranker.schema)
    for b in self.cfg.buckets:
      if self.users is not None:
        active.compiled[b] = self.users.compile_step(ranker.graphdef, s, state, b)
      else:
        args = (jax.ShapeDtypeStruct((b, s.num_dense), jnp.float32),
                jax.ShapeDtypeStruct((b, s.num_sparse, s.max_len), jnp.int32),
                jax.ShapeDtypeStruct((b, s.num_sparse, s.max_len), jnp.bool_))
        active.compiled[b] = step.lower(state, *args).compile()
      jax.block_until_ready(self._run_bucket(active, concat_rows([], s, b), []))  # warm-up, no request
    return active

  def start(self) -> "Engine":
    """Compiles every bucket ahead of time, runs each once, and starts the worker thread (and the
    user model's refresh worker)."""
    try:
      if self.users is not None:
        self.users.start()
        self._holds_users = True
      self._active = self._prepare(self._active.ranker)
      self._worker = threading.Thread(target=self._loop, name="jaxrec-serve-batcher", daemon=True)
      self._worker.start()
    except BaseException:  # a compile that fails must not leave the (shared) user model held
      self.close(drain=False)
      raise
    return self

  def close(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops taking requests. drain=True scores every queued request first; drain=False fails
    them with EngineClosed. Returns when the worker has stopped, or after `timeout` s: the worker
    then goes on draining and lets go of the user model when it stops (a batch still running keeps
    its user-model inference and failover path)."""
    with self._lock:
      self._closed = True
      self._drain = drain
      self._close_args = (drain, timeout)
    self._stop.set()
    if self._worker is not None:
      self._worker.join(timeout)
    if self._worker is None or not self._worker.is_alive():
      self._release_users()

  def _release_users(self) -> None:
    """Once per start, however often called (close, and the worker as it stops after a close that
    timed out): the user model may be shared, its last holder stops its refresh worker."""
    with self._lock:
      release, self._holds_users = self._holds_users, False
      drain, timeout = self._close_args
    if release:
      self.users.close(drain=drain, timeout=timeout)

  def __enter__(self) -> "Engine":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  # ---- hot swap

  def swap(self, ranker: LoadedRanker) -> int:
    """Serves `ranker` from the next batch on; returns its version.

    Compiles and warms every bucket for the new state on the calling thread (the worker keeps
    serving the old one meanwhile), then replaces the served ranker between two batches: requests
    in flight or queued never fail, each is scored wholly by the old or the new one. Raises
    SwapError, and keeps serving the old ranker, if the new one has another schema or graph."""
    with self._swap_lock, self._counting_refusals():
      self._check_swappable(ranker)
      self._activate(self._prepare(ranker, compile_steps=self._worker is not None))
    return ranker.version

  def _activate(self, active: _Active) -> None:
    self._active = active  # one reference assignment: the worker sees the old or the new whole
    with self._stats_lock:
      self._counts["swaps"] += 1

  @contextlib.contextmanager
  def _counting_refusals(self):
    try:
      yield
    except SwapError:
      with self._stats_lock:
        self._counts["failed_swaps"] += 1
      raise

  def _check_swappable(self, ranker: LoadedRanker) -> None:
    """SwapError unless `ranker` has the served one's schema, graph and parameter shapes."""
    old = self._active.ranker
    if ranker.schema != old.schema:
      raise SwapError(f"the new checkpoint's schema differs from the served one: dense {ranker.schema.dense} vs "
                      f"{old.schema.dense}, sparse {ranker.schema.sparse} vs {old.schema.sparse}, labels "
                      f"{ranker.schema.labels} vs {old.schema.labels}; start a new engine for it")
    if ranker.graphdef != old.graphdef or _abstract(ranker.state) != _abstract(old.state):
      raise SwapError("the new checkpoint's model graph or parameter shapes differ from the served one "
                      "(another model config); start a new engine for it")

  def reload(self) -> dict:
    """Hot-swaps in the newest checkpoint of the served ranker's workdir (see `swap`) and of its
    user model; returns {"version": ranker step, "user_model_version": user-model step or None}.
    `reload_together([self])`: a user model that other started engines share is refused here
    (SwapError): reload those engines with this one (`reload_together`, `Registry.reload`)."""
    return reload_together([self])[self]

  def _load_newest(self) -> LoadedRanker:
    """The newest checkpoint of the served ranker's workdir, checked swappable; SwapError otherwise."""
    ranker = self._active.ranker
    if ranker.workdir is None:
      raise SwapError("the served ranker was not loaded from a workdir (use load_ranker); nothing to reload")
    try:
      new = load_ranker(ranker.workdir)
    except Exception as e:  # noqa: BLE001 - unreadable, partial or deleted checkpoint, bad config: keep serving
      raise SwapError(f"cannot load the newest checkpoint of {ranker.workdir}: {type(e).__name__}: {e}") from None
    self._check_swappable(new)
    return new

  # ---- introspection

  def describe(self) -> dict:
    """JSON-able description of what is served: {"version", "dense": [names a request may send],
    "sparse": [{"name", "vocab_size", "max_len"}], "server_filled": [dense features the server fills
    (user_emb_*), never sent], "objectives": [labels], "max_candidates", "user_model": None or
    {"workdir", "version", "embedding_dim", "features": [the tower's request features], "dense",
    "sparse" (those features, as above), "cache": {...}}}."""
    r, s = self._active.ranker, self.schema
    return {"version": r.version, "dense": [n for n in s.dense if n not in self._server_filled],
            "sparse": [{"name": f.name, "vocab_size": f.vocab_size, "max_len": f.max_len} for f in s.sparse],
            "server_filled": [n for n in s.dense if n in self._server_filled],
            "objectives": list(s.labels), "max_candidates": self.cfg.max_candidates,
            "user_model": None if self.users is None else self.users.describe()}

  def example_request(self) -> dict:
    """A valid JSON request body for this model, 3 candidates: {"features": {user and context
    features}, "candidates": [{ad features}, ...]} (plus "user_id" when a user model is consumed)."""
    rng = np.random.default_rng(0)
    s = self.schema
    filled = self._server_filled
    sparse = {f.name: f for f in s.sparse}
    dense = set(s.dense)
    if self.users is not None:
      u = self.users.embedder.schema
      sparse.update({f.name: f for f in u.sparse if f.name in self.users.features and f.name not in sparse})
      dense |= {n for n in u.dense if n in self.users.features}

    def value(name):
      if name in dense:
        return round(float(rng.normal()), 3)
      f = sparse[name]
      hi = 1000 if f.vocab_size is None else f.vocab_size
      return int(rng.integers(0, hi)) if f.max_len == 1 else [int(i) for i in rng.integers(0, hi, size=f.max_len)]

    user = CONTEXT_FEATURES | (frozenset() if self.users is None else self.users.features)
    names = [n for n in list(s.dense) + [f.name for f in s.sparse] if n not in filled]
    names += sorted((dense | set(sparse)) - set(names) - filled)
    features = {n: value(n) for n in names if n in user}
    candidates = [{n: value(n) for n in names if n not in user} for _ in range(3)]
    body = {"features": features, "candidates": candidates}
    if self.users is not None:
      body = {"user_id": int(features.get("user_id", 0)), **body}
    return body

  def stats(self) -> dict:
    """JSON-able counters since start (cheap; any thread): requests, rows, batches per bucket,
    histogram of requests per batch (bins "1", "2", "4", ...: at most that many), queue depth,
    failed batches and requests, swaps, the served version."""
    with self._stats_lock:
      out = {**self._counts, "batches": {str(b): n for b, n in self.batches_run.items()},
             "batch_requests_hist": dict(sorted(self._batch_hist.items(), key=lambda kv: int(kv[0])))}
    out["queue_depth"] = self._queue.qsize()
    out["version"] = self._active.ranker.version
    if self.users is not None:
      out["user_model_version"] = self.users.version
      out["user_embedding"] = self.users.stats()
    return out

  # ---- requests

  def encoder(self) -> RequestEncoder:
    """What validating and encoding a request needs, as plain data (schemas stay fixed across swaps:
    `swap` refuses a ranker or user model with another schema)."""
    u = self.users
    if u is None:
      return RequestEncoder(self.schema, self.cfg.max_candidates)
    return RequestEncoder(self.schema, self.cfg.max_candidates, user_schema=u.embedder.schema,
                          user_features=frozenset(u.features), server_filled=self._server_filled)

  def submit(self, req: RankRequest) -> concurrent.futures.Future:
    """Queues `req`; the future resolves to a RankResponse. Raises RequestError (invalid request),
    Overloaded (queue full) or EngineClosed, all on the caller's thread."""
    return self.submit_encoded(self._encoder.encode(req))

  def submit_encoded(self, enc: EncodedRequest) -> concurrent.futures.Future:
    """`submit` for a request already validated and encoded by this engine's `encoder()` (the HTTP
    worker processes do that part); raises Overloaded or EngineClosed."""
    item = _Pending(enc.rows, concurrent.futures.Future(), enc.user_id, enc.user_row)
    with self._lock:
      if self._closed or self._worker is None:
        raise EngineClosed("the engine is not running (start() it, or it was closed)")
      try:
        self._queue.put_nowait(item)
      except queue.Full:
        raise Overloaded(f"request queue full ({self.cfg.max_queue} waiting)") from None
    return item.future

  def rank(self, req: RankRequest, timeout: float | None = None) -> RankResponse:
    """submit(req) and wait for its response (concurrent.futures.TimeoutError after `timeout` s)."""
    return self.submit(req).result(timeout)

  # ---- worker

  def _run_bucket(self, active: _Active, rows: Rows, batch: list[_Pending]):
    """Device outputs of the bucket step over `rows` (those of `batch`, then padding): probs [B, T],
    and with a user model also (source, age, version) [B], request i of `batch` in slot i."""
    b = rows.num_rows
    if self.users is not None:
      return self.users.run(active.compiled[b], active.state, rows, [p.user_id for p in batch],
                            [p.rows.num_rows for p in batch], [p.user_row for p in batch])
    args = jax.device_put((rows.dense, rows.sparse, rows.sparse_mask), self.device)
    with jax.transfer_guard("disallow"):  # nothing but the explicit transfers above
      return active.compiled[b](active.state, *args)

  def _loop(self) -> None:
    try:
      self._serve_queue()
    finally:  # stopped by close(): if that close timed out, the user model is let go of only now
      self._release_users()

  def _serve_queue(self) -> None:
    carry: _Pending | None = None
    while True:
      if carry is None:
        try:
          carry = self._queue.get(timeout=0.05)
        except queue.Empty:
          # close() sets the stop flag after the last submit can queue: a request queued since the
          # timeout is in the queue now
          if self._stop.is_set() and self._queue.empty():
            return
          continue
      if self._stop.is_set() and not self._drain:
        self._fail_queued(carry)
        return
      batch, carry = self._gather(carry)
      self._run(batch)

  def _gather(self, first: _Pending) -> tuple[list[_Pending], _Pending | None]:
    """Requests for one batch, starting with `first`; returns (batch, the request that did not fit)."""
    batch, rows = [first], first.rows.num_rows
    deadline = time.monotonic() + self.cfg.max_wait_ms / 1e3
    while rows < self.cfg.max_rows:
      left = deadline - time.monotonic()
      try:
        item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
      except queue.Empty:
        break
      if rows + item.rows.num_rows > self.cfg.max_rows:
        return batch, item
      batch.append(item)
      rows += item.rows.num_rows
    return batch, None

  def _run(self, batch: list[_Pending]) -> None:
    batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
    if not batch:
      return
    active = self._active  # one ranker for the whole batch, even if a swap lands meanwhile
    n = sum(p.rows.num_rows for p in batch)
    try:
      bucket = self.cfg.bucket_for(n)
      rows = concat_rows([p.rows for p in batch], self.schema, bucket)
      out = jax.device_get(self._run_bucket(active, rows, batch))
      infos = [None] * len(batch)
      if self.users is None:
        probs = out
      else:
        probs, (source, age, version) = out[0], out[1:]
        k = len(batch)
        names = self.users.refresh([p.user_id for p in batch], [p.user_row for p in batch], source[:k])
        infos = [UserEmbeddingInfo(nm, int(a), int(v)) for nm, a, v in zip(names, age[:k], version[:k])]
    except Exception as e:  # noqa: BLE001 - a failed batch fails its requests, not the worker
      with self._stats_lock:
        self._counts["failed_batches"] += 1
        self._counts["failed_requests"] += len(batch)
      for p in batch:
        p.future.set_exception(e)
      return
    with self._stats_lock:
      self.batches_run[bucket] += 1
      self._counts["requests"] += len(batch)
      self._counts["rows"] += n
      key = _batch_bins(len(batch))
      self._batch_hist[key] = self._batch_hist.get(key, 0) + 1
    start = 0
    for p, info in zip(batch, infos):
      k = p.rows.num_rows
      part = probs[start:start + k]
      start += k
      p.future.set_result(RankResponse(scores={t: part[:, i].copy() for i, t in enumerate(self.schema.labels)},
                                       model_version=active.ranker.version, user_embedding=info))

  def _fail_queued(self, carry: _Pending | None) -> None:
    items = [carry] if carry is not None else []
    while True:
      try:
        items.append(self._queue.get_nowait())
      except queue.Empty:
        break
    for p in items:
      if p.future.set_running_or_notify_cancel():
        p.future.set_exception(EngineClosed("the engine closed without draining"))


def reload_together(engines: list[Engine]) -> dict[Engine, dict]:
  """Hot-swaps every engine to its workdir's newest ranker checkpoint and every user model they
  consume to its newest checkpoint, all at once: each new ranker and user model is loaded, checked
  and compiled first (while the old ones serve), then the user models and rankers are switched in
  together, so that no ranker reads embeddings of a user model it was not trained with while another
  compiles (embeddings already cached stay and age out: the cache mixes versions by design). Returns
  {engine: {"version", "user_model_version"}}.

  A user model is shared by every started engine that consumes it, so all of them must be in
  `engines`. On any SwapError nothing is switched, and every engine counts a refused swap."""
  users = {id(e.users): e.users for e in engines if e.users is not None}
  with contextlib.ExitStack() as stack:
    for e in sorted(set(engines), key=id):  # one lock order for every caller
      stack.enter_context(e._swap_lock)
      stack.enter_context(e._counting_refusals())  # a SwapError below counts once per engine
    for u in users.values():
      inside = sum(1 for e in set(engines) if e.users is u and e._holds_users)
      if u.holders > inside:
        raise SwapError(f"the user model {str(u.embedder.tower.workdir)!r} is shared with {u.holders - inside} "
                        "other served ranker(s): reload them together (python -m serve's /admin/reload "
                        "without ?model=, or with any one of them, does)")
    new = {e: e._load_newest() for e in engines}
    towers = {}
    for key, u in users.items():
      workdir = u.embedder.tower.workdir
      try:
        tower = load_user_model(workdir)
      except Exception as e:  # noqa: BLE001 - as for the ranker: keep serving
        raise SwapError(f"cannot load the newest user model of {workdir}: {type(e).__name__}: {e}") from None
      if tower.step != u.version:
        try:
          towers[key] = u.prepare_tower(tower)
        except ValueError as e:
          raise SwapError(str(e)) from None
    actives = {e: e._prepare(r, compile_steps=e._worker is not None) for e, r in new.items()}
    for key, embedder in towers.items():
      users[key].use_embedder(embedder)
    for e, active in actives.items():
      e._activate(active)
  return {e: {"version": new[e].version, "user_model_version": None if e.users is None else e.users.version}
          for e in engines}


def _monotonic_s() -> int:
  return int(time.monotonic())


def open_engine(workdir: Path, cfg: EngineConfig = EngineConfig(), *, clock: Callable[[], int] = _monotonic_s,
                shared_users: dict | None = None) -> Engine:
  """An Engine (not started) over the newest checkpoint of the ranker trained in `workdir`, and,
  when its config names a user model (data.user_model), that user model's newest checkpoint and its
  cache (`cfg.user_cache`). `clock() -> int` seconds, monotone, times the cache (tests fake it).
  `shared_users`: a dict kept across the engines of one server, so that rankers consuming the same
  user model share its cache and refresh worker (see serve.user_embedding.load_user_embeddings)."""
  ranker = load_ranker(workdir)
  users = None
  if ranker.config is not None and ranker.config.data.user_model:
    users = load_user_embeddings(Path(workdir), ranker.config.data.user_model, cfg.user_cache, ranker.schema,
                                 jax.local_devices()[0], clock, cfg.buckets, shared_users)
  return Engine(ranker, cfg, users=users)
