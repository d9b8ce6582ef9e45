"""ERCache: a per-user-model cache of user embeddings with a direct and a failover tier, on device.

One `ERCacheState` per user model, sized and timed by its `ERCacheConfig` (ERCache,
arXiv 2410.06497; ../shared/reference/papers.md section 2):

- the **direct tier** ([Cd, D]) holds the embedding served while it is younger than
  `direct_ttl_s`: such a request skips user-model inference (`Source.DIRECT`);
- the **failover tier** ([Cf, m*D], larger and longer-lived) holds, per user, a ring of the last
  m embeddings written (`stabilize_m`, SUM/SOAP's embedding stabilization). When inference fails
  or misses its deadline, a user whose newest write is younger than `failover_ttl_s` gets the
  ring's mean (`Source.FAILOVER`), anyone else the model's default embedding (`Source.FALLBACK`).

Every write goes to both tiers: the embedding is appended to the user's failover ring (a ring
older than `failover_ttl_s` starts afresh), and the ring's mean, the *stabilized* embedding, is
what the direct tier stores and what a fresh inference serves (`Source.FRESH`). With m = 1 this
is the embedding itself. Each tier evicts, when a key's probe window is full, the oldest write
(so expired entries go first). Times are integer seconds (i32) on any clock the caller keeps
monotone; an embedding written at t is "younger than ttl" at `now` when `now - t < ttl`, so
`direct_ttl_s=0` never skips inference (pure SOAP).

Shapes: user ids are pairs (hi, lo) of u32 [B] (`split_keys(int64 ids)`, on the host), `now` and
`version` i32 scalars, `valid` bool [B] masks the padding of a fixed-shape batch (masked rows read
as FALLBACK, write nothing and count nowhere). All functions are pure and jit-compiled,
`f(state, ...) -> (state, ...)`; nothing leaves the device. They donate the state, so that the
tiers are updated in place or passed through, never copied: the state passed in is dead
afterwards (keep only the returned one). Cumulative counters (64-bit, as u32 [2] pairs (hi, lo)
with a carry: a request-rate counter in u32 would wrap within days; see `COUNTERS`) ride in the
state for a metrics exporter to read off the request path with `read_counters`.

Serving loop, synchronously (the server decides `ok`: inference succeeded within its deadline):

    state, served = lookup(state, ids, now)                   # DIRECT or NEEDS_INFERENCE
    emb, ok = run_user_model(...)                             # rows that need it
    state, served = resolve_after_inference(state, ids, now, served, emb, ok, version)
    # served.source in {DIRECT, FRESH, FAILOVER, FALLBACK}

>>> import jax.numpy as jnp
>>> cfg = ERCacheConfig(dim=2, direct_ttl_s=60, failover_ttl_s=3600, direct_capacity=16,
...                     failover_capacity=16)
>>> state = ERCacheState.create(cfg)
>>> ids = split_keys([7])
>>> state = write(state, ids, jnp.ones((1, 2)), now=100, version=3)
>>> state, served = lookup(state, ids, now=130)
>>> Source(int(served.source[0])).name, int(served.age[0]), int(served.version[0])
('DIRECT', 30, 3)
>>> state, served = failover(state, ids, now=1000)   # past the direct TTL, inside the failover TTL
>>> Source(int(served.source[0])).name
'FAILOVER'
>>> read_counters(state)["direct_hits"], read_counters(state)["failover_hits"]
(1, 1)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from jaxrec.cache.hash_table import HashTable, insert, probe, ring_mean, split_keys

Keys = tuple[jax.Array, jax.Array]  # (hi, lo) u32 [B] halves of int64 user ids


class Source(enum.IntEnum):
  """Where a served user embedding came from (`Served.source`)."""
  DIRECT = 0  # direct-tier hit: user-model inference skipped
  NEEDS_INFERENCE = 1  # `lookup` only: no fresh embedding; the row carries the fallback for now
  FRESH = 2  # computed by the user model for this request, stabilized, written to both tiers
  FAILOVER = 3  # inference failed or missed its deadline: the failover ring's (stale) mean
  FALLBACK = 4  # nothing usable cached (or a masked row): the model's default embedding


COUNTERS = (
    "direct_hits",  # rows served from the direct tier (= user-model inferences saved)
    "direct_misses",  # rows `lookup` sent to inference
    "direct_evictions",  # direct-tier writes that evicted another key
    "failover_hits",  # rows served a stale embedding from the failover tier
    "failover_misses",  # rows that asked the failover tier and found nothing young enough
    "failover_evictions",  # failover-tier writes that evicted another key
    "fresh",  # rows served a fresh inference (`resolve_after_inference`)
    "inference_failures",  # rows whose inference failed or missed its deadline
    "fallbacks",  # rows served the default embedding (= failover_misses)
    "writes",  # embeddings written (to both tiers)
)


@dataclasses.dataclass(frozen=True)
class ERCacheConfig:
  """The cache of one user model. Capacities are slots; keep failover_capacity >= direct_capacity
  (the failover ring is the stabilization history: a user evicted from it restarts at m = 1)."""
  dim: int = 64  # embedding width D
  direct_ttl_s: int = 60  # serve a cached embedding without inference while younger than this
  failover_ttl_s: int = 86_400  # on failure, serve a stale embedding while younger than this
  direct_capacity: int = 1 << 16
  failover_capacity: int = 1 << 18
  dtype: Literal["float32", "bfloat16"] = "float32"  # stored and served embedding dtype
  stabilize_m: int = 1  # served embedding = mean of the user's last m embeddings written
  direct_max_probes: int = 16  # probe window (and eviction candidates) of the direct tier
  failover_max_probes: int = 16

  def __post_init__(self):
    if self.dim < 1 or self.stabilize_m < 1:
      raise ValueError(f"dim and stabilize_m must be >= 1, got {self.dim} and {self.stabilize_m}")
    if not 0 <= self.direct_ttl_s <= self.failover_ttl_s:
      raise ValueError(f"need 0 <= direct_ttl_s <= failover_ttl_s, got {self.direct_ttl_s} and "
                       f"{self.failover_ttl_s}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


@struct.dataclass
class Served:
  """What a batch of rows is served. B rows, D = config.dim."""
  embedding: jax.Array  # [B, D] config dtype
  source: jax.Array  # i32 [B], a `Source`
  age: jax.Array  # i32 [B] seconds since the served embedding was written (0 FRESH); -1 if none
  version: jax.Array  # i32 [B] user-model version of the newest write behind it; -1 if none


@struct.dataclass
class ERCacheState:
  direct: HashTable  # values [Cd, D]: the stabilized embedding
  failover: HashTable  # values [Cf, m * D]: ring of the last m embeddings, `writes` counts them
  fallback: jax.Array  # [D] default embedding
  counters: dict  # name (COUNTERS) -> u32 [2] (hi, lo), cumulative (`counter_values`)
  config: ERCacheConfig = struct.field(pytree_node=False)

  @classmethod
  def create(cls, config: ERCacheConfig, fallback: jax.Array | None = None) -> "ERCacheState":
    """Empty tiers; `fallback` [D] defaults to zeros."""
    dtype = jnp.dtype(config.dtype)
    fb = jnp.zeros((config.dim,), dtype) if fallback is None else jnp.asarray(fallback, dtype)
    if fb.shape != (config.dim,):
      raise ValueError(f"fallback must have shape ({config.dim},), got {fb.shape}")
    direct = HashTable.create(config.direct_capacity, config.dim, dtype=dtype,
                              max_probes=min(config.direct_max_probes, config.direct_capacity))
    fail = HashTable.create(config.failover_capacity, config.stabilize_m * config.dim, dtype=dtype,
                            max_probes=min(config.failover_max_probes, config.failover_capacity))
    return cls(direct, fail, fb, {k: jnp.zeros((2,), jnp.uint32) for k in COUNTERS}, config)


def counter_values(counters) -> dict[str, int]:
  """{name: int} from a state's counters ({name: u32 [2] (hi, lo)}, on device or host)."""
  return {k: (int(v[0]) << 32) | int(v[1]) for k, v in jax.device_get(counters).items()}


def read_counters(state: ERCacheState) -> dict[str, int]:
  """Host copy of the cumulative counters (one device-to-host transfer; not for the hot path)."""
  return counter_values(state.counters)


def _count(state: ERCacheState, **add) -> ERCacheState:
  """Adds to 64-bit counters kept as u32 (hi, lo): one add is below 2**32 (a batch's rows), so
  one carry suffices."""
  counters = dict(state.counters)
  for k, v in add.items():
    hi, lo = counters[k][0], counters[k][1]
    new_lo = lo + jnp.asarray(v).astype(jnp.uint32)
    counters[k] = jnp.stack([hi + (new_lo < lo).astype(jnp.uint32), new_lo])
  return state.replace(counters=counters)


def _valid(user_ids: Keys, valid):
  return jnp.ones(user_ids[0].shape, bool) if valid is None else jnp.asarray(valid, bool)


def _direct_read(state: ERCacheState, user_ids: Keys, now):
  """(hit [B], embedding [B, D], age [B], version [B]) from the direct tier, TTL applied."""
  t = state.direct
  slot, present = probe(t, *user_ids)
  age = jnp.maximum(now - t.write_time[slot], 0)  # a write stamped after `now` (clock read before a racing write)
  hit = present & (age < state.config.direct_ttl_s)
  return hit, t.values[slot], age, t.version[slot]


def _failover_read(state: ERCacheState, user_ids: Keys, now):
  """(hit [B], stabilized embedding f32 [B, D], age [B], version [B]) from the failover ring."""
  t = state.failover
  slot, present = probe(t, *user_ids)
  age = jnp.maximum(now - t.write_time[slot], 0)
  hit = present & (age < state.config.failover_ttl_s)
  return hit, ring_mean(t.values[slot], t.writes[slot], state.config.stabilize_m), age, t.version[slot]


def _served(state: ERCacheState, hit, embedding, age, version, source_hit, source_miss) -> Served:
  b = hit.shape[0]
  fb = jnp.broadcast_to(state.fallback, (b, state.config.dim))
  return Served(jnp.where(hit[:, None], embedding.astype(fb.dtype), fb),
                jnp.where(hit, jnp.int32(source_hit), jnp.int32(source_miss)),
                jnp.where(hit, age, -1).astype(jnp.int32), jnp.where(hit, version, -1).astype(jnp.int32))


def _merge(take: jax.Array, a: Served, b: Served) -> Served:
  """Rows of `a` where take [B], else rows of `b`."""
  return jax.tree.map(lambda x, y: jnp.where(take.reshape(take.shape + (1,) * (x.ndim - 1)), x, y), a, b)


def _mask(state: ERCacheState, valid: jax.Array, served: Served) -> Served:
  """Masked (padding) rows read as FALLBACK."""
  b = valid.shape[0]
  fb = Served(jnp.broadcast_to(state.fallback, (b, state.config.dim)),
              jnp.full((b,), Source.FALLBACK, jnp.int32), jnp.full((b,), -1, jnp.int32),
              jnp.full((b,), -1, jnp.int32))
  return _merge(valid, served, fb)


@jax.jit
def direct_fresh(state: ERCacheState, user_ids: Keys, now) -> jax.Array:
  """bool [B]: whether a lookup at `now` would be a DIRECT hit. Counts nothing (for workers that
  drop already-refreshed users from their queue)."""
  return _direct_read(state, user_ids, jnp.asarray(now, jnp.int32))[0]


@functools.partial(jax.jit, donate_argnames="state")
def lookup(state: ERCacheState, user_ids: Keys, now, valid=None) -> tuple[ERCacheState, Served]:
  """Direct tier: DIRECT rows (embedding younger than direct_ttl_s) skip inference; the rest are
  NEEDS_INFERENCE and carry the fallback embedding until `resolve_after_inference`."""
  now = jnp.asarray(now, jnp.int32)
  valid = _valid(user_ids, valid)
  hit, emb, age, version = _direct_read(state, user_ids, now)
  hit = hit & valid
  state = _count(state, direct_hits=jnp.sum(hit), direct_misses=jnp.sum(valid & ~hit))
  return state, _mask(state, valid, _served(state, hit, emb, age, version, Source.DIRECT,
                                            Source.NEEDS_INFERENCE))


@functools.partial(jax.jit, donate_argnames="state")
def latest(state: ERCacheState, user_ids: Keys, now, valid=None) -> tuple[ERCacheState, Served]:
  """The newest available embedding without waiting for inference (SOAP's request path): DIRECT
  where the direct tier is young enough, else FAILOVER from the failover ring (a refresh is
  pending), else FALLBACK. Rows not DIRECT want a refresh. Counts as `lookup` then `failover`."""
  now = jnp.asarray(now, jnp.int32)
  valid = _valid(user_ids, valid)
  state, direct = lookup(state, user_ids, now, valid)
  needs = valid & (direct.source != Source.DIRECT)
  state, stale = failover(state, user_ids, now, needs)
  return state, _mask(state, valid, _merge(needs, stale, direct))


@functools.partial(jax.jit, donate_argnames="state")
def failover(state: ERCacheState, user_ids: Keys, now, valid=None) -> tuple[ERCacheState, Served]:
  """The failover path (inference failed or missed its deadline): FAILOVER rows get the mean of
  their ring if the newest write is younger than failover_ttl_s, the rest FALLBACK."""
  now = jnp.asarray(now, jnp.int32)
  valid = _valid(user_ids, valid)
  hit, emb, age, version = _failover_read(state, user_ids, now)
  hit = hit & valid
  miss = jnp.sum(valid & ~hit)
  state = _count(state, failover_hits=jnp.sum(hit), failover_misses=miss, fallbacks=miss)
  return state, _served(state, hit, emb, age, version, Source.FAILOVER, Source.FALLBACK)


def _write(state: ERCacheState, user_ids: Keys, embeddings, now, version, valid):
  """Appends to the failover rings, stores their means in the direct tier; returns the state and
  the stabilized embeddings [B, D] (config dtype). Rows apply in order: duplicates all append."""
  cfg = state.config
  if embeddings.shape != (user_ids[0].shape[0], cfg.dim):
    raise ValueError(f"embeddings must be [B, {cfg.dim}], got {embeddings.shape}")
  dtype = state.fallback.dtype
  version = jnp.asarray(version, jnp.int32)
  fail, fs = insert(state.failover, *user_ids, embeddings.astype(dtype), now, version, valid,
                    ring=cfg.stabilize_m, restart_age=jnp.int32(cfg.failover_ttl_s - 1))
  slot, present = probe(fail, *user_ids)  # absent only if a later row of this batch evicted it
  mean = ring_mean(fail.values[slot], fail.writes[slot], cfg.stabilize_m).astype(dtype)
  stabilized = jnp.where(present[:, None], mean, embeddings.astype(dtype))
  direct, ds = insert(state.direct, *user_ids, stabilized, now, version, valid)
  state = state.replace(direct=direct, failover=fail)
  state = _count(state, direct_evictions=ds["evicted"], failover_evictions=fs["evicted"],
                 writes=jnp.sum(valid))
  return state, stabilized


@functools.partial(jax.jit, donate_argnames="state")
def write(state: ERCacheState, user_ids: Keys, embeddings: jax.Array, now, version,
          valid=None) -> ERCacheState:
  """Writes embeddings [B, D] from user-model `version` at `now` to both tiers (the async path)."""
  return _write(state, user_ids, embeddings, jnp.asarray(now, jnp.int32), version,
                _valid(user_ids, valid))[0]


@functools.partial(jax.jit, donate_argnames="state")
def resolve_after_inference(state: ERCacheState, user_ids: Keys, now, looked_up: Served,
                            embeddings: jax.Array, ok: jax.Array, version,
                            valid=None) -> tuple[ERCacheState, Served]:
  """Completes `lookup`'s rows. `embeddings` [B, D] and `ok` bool [B] are the user model's output
  and whether it succeeded within its deadline (read only on NEEDS_INFERENCE rows). Those with
  ok are written and served FRESH (stabilized, age 0); the others take the failover path.
  DIRECT rows are passed through."""
  now = jnp.asarray(now, jnp.int32)
  valid = _valid(user_ids, valid)
  need = valid & (looked_up.source == Source.NEEDS_INFERENCE)
  good = need & jnp.asarray(ok, bool)
  state, stabilized = _write(state, user_ids, embeddings, now, version, good)
  state = _count(state, fresh=jnp.sum(good), inference_failures=jnp.sum(need & ~good))
  state, stale = failover(state, user_ids, now, need & ~good)
  b = good.shape[0]
  fresh = Served(stabilized, jnp.full((b,), Source.FRESH, jnp.int32), jnp.zeros((b,), jnp.int32),
                 jnp.full((b,), version, jnp.int32))
  return state, _mask(state, valid, _merge(good, fresh, _merge(need, stale, looked_up)))


__all__ = ["COUNTERS", "ERCacheConfig", "ERCacheState", "Keys", "Served", "Source", "counter_values", "direct_fresh",
           "failover", "latest", "lookup", "read_counters", "resolve_after_inference", "split_keys", "write"]
