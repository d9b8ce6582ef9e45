"""ERCache's tiers against a Python reference model under random interleaved operations."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrec.cache import (COUNTERS, ERCacheConfig, ERCacheState, Source, ercache, probe, read_counters,
                          split_keys)
from tests.cache.test_hash_table import held_keys

B = 8  # every batch is padded to B rows with valid=False: one compile per function and config
D = 3
FALLBACK = np.asarray([-1.0, 0.5, 2.0], np.float32)


def _cfg(direct_ttl, failover_ttl, m, dtype="float32", cap=(256, 256), probes=None):
  return ERCacheConfig(dim=D, direct_ttl_s=direct_ttl, failover_ttl_s=failover_ttl, direct_capacity=cap[0],
                       failover_capacity=cap[1], dtype=dtype, stabilize_m=m,
                       direct_max_probes=probes[0] if probes else cap[0],
                       failover_max_probes=probes[1] if probes else cap[1])


# A handful of configs (each compiles once): TTL 0 (never skip inference), equal TTLs, bf16, m > 1.
CONFIGS = [_cfg(0, 0, 1), _cfg(2, 5, 2), _cfg(3, 3, 3, "bfloat16"), _cfg(1, 6, 1)]


class Reference:
  """The semantics in ercache's docstring, with dicts and lists; no capacity limit."""

  def __init__(self, cfg: ERCacheConfig):
    self.cfg = cfg
    self.dtype = ml_dtypes.bfloat16 if cfg.dtype == "bfloat16" else np.float32
    self.direct: dict[int, tuple[np.ndarray, int, int]] = {}  # key -> (embedding, time, version)
    self.fail: dict[int, tuple[list[np.ndarray], int, int]] = {}  # key -> (ring, time, version)
    self.counters = dict.fromkeys(COUNTERS, 0)

  def _cast(self, x):
    return np.asarray(x, np.float32).astype(self.dtype).astype(np.float32)

  def _mean(self, ring):
    return self._cast(np.sum(ring, axis=0, dtype=np.float32) / np.float32(len(ring)))

  def _fallback(self):
    return (self._cast(FALLBACK), Source.FALLBACK, -1, -1)

  def lookup_row(self, k, now):
    if k in self.direct and now - self.direct[k][1] < self.cfg.direct_ttl_s:
      e, t, v = self.direct[k]
      self.counters["direct_hits"] += 1
      return (e, Source.DIRECT, now - t, v)
    self.counters["direct_misses"] += 1
    return (self._cast(FALLBACK), Source.NEEDS_INFERENCE, -1, -1)

  def failover_row(self, k, now):
    if k in self.fail and now - self.fail[k][1] < self.cfg.failover_ttl_s:
      ring, t, v = self.fail[k]
      self.counters["failover_hits"] += 1
      return (self._mean(ring), Source.FAILOVER, now - t, v)
    self.counters["failover_misses"] += 1
    self.counters["fallbacks"] += 1
    return self._fallback()

  def write_row(self, k, e, now, v):
    e = self._cast(e)
    old = self.fail.get(k)
    ring = (old[0] if old and now - old[1] < self.cfg.failover_ttl_s else []) + [e]
    ring = ring[-self.cfg.stabilize_m:]
    self.fail[k] = (ring, now, v)
    self.direct[k] = (self._mean(ring), now, v)
    self.counters["writes"] += 1

  # batched operations: rows are (key, valid, ok, embedding)
  def lookup(self, rows, now):
    return [self.lookup_row(k, now) if valid else self._fallback() for k, valid, _, _ in rows]

  def failover(self, rows, now):
    return [self.failover_row(k, now) if valid else self._fallback() for k, valid, _, _ in rows]

  def latest(self, rows, now):
    out = []
    for k, valid, _, _ in rows:
      r = self.lookup_row(k, now) if valid else self._fallback()
      out.append(self.failover_row(k, now) if r[1] == Source.NEEDS_INFERENCE else r)
    return out

  def write(self, rows, now, v):
    for k, valid, _, e in rows:
      if valid:
        self.write_row(k, e, now, v)

  def resolve(self, rows, now, looked, v):
    need = [valid and r[1] == Source.NEEDS_INFERENCE for (_, valid, _, _), r in zip(rows, looked)]
    for (k, _, ok, e), n in zip(rows, need):
      if n and ok:
        self.write_row(k, e, now, v)
    out = []
    for (k, valid, ok, _), n, r in zip(rows, need, looked):
      if n and ok:
        self.counters["fresh"] += 1
        out.append((self._mean(self.fail[k][0]), Source.FRESH, 0, v))  # after the whole batch
      elif n:
        self.counters["inference_failures"] += 1
        out.append(None)  # the failover path runs after every write
      else:
        out.append(r if valid else self._fallback())
    return [self.failover_row(k, now) if o is None else o for (k, _, _, _), o in zip(rows, out)]


def _device_batch(rows):
  pad = [(0, False, False, np.zeros(D, np.float32))] * (B - len(rows))
  rows = list(rows) + pad
  keys = split_keys([r[0] for r in rows])
  return (keys, jnp.asarray([r[1] for r in rows]), jnp.asarray([r[2] for r in rows]),
          jnp.asarray(np.stack([r[3] for r in rows]), jnp.float32))


def _check(served, want):
  emb, src, age, ver = (np.asarray(x).astype(np.float32) if i == 0 else np.asarray(x)
                        for i, x in enumerate(jax.device_get((served.embedding, served.source, served.age,
                                                             served.version))))
  for i, (e, s, a, v) in enumerate(want):
    assert (Source(int(src[i])), int(age[i]), int(ver[i])) == (s, a, v), i
    np.testing.assert_allclose(emb[i], e, rtol=1e-6, err_msg=str(i))  # XLA may divide by reciprocal
  for i in range(len(want), B):  # padding
    assert Source(int(src[i])) == Source.FALLBACK


# Few keys, so that rows collide across and within batches; the large ones exercise both halves.
KEYS = st.one_of(st.integers(0, 3), st.integers(0, 3),
                 st.sampled_from([1, -1, 2 ** 32 + 1, -(2 ** 63), 2 ** 63 - 1]))
ROW = st.tuples(KEYS, st.sampled_from([True, True, True, False]), st.booleans(),
                st.integers(-8, 8).map(lambda s: np.asarray([s, 2 * s + 1, -s], np.float32)))
ROWS = st.lists(ROW, min_size=1, max_size=B)
OP_NAMES = ["lookup", "failover", "latest", "write", "infer", "infer"]  # infer: lookup + resolve
OPS = st.lists(st.one_of(st.tuples(st.just("advance"), st.sampled_from([0, 1, 1, 2, 3, 5, 6])),
                         st.tuples(st.sampled_from(OP_NAMES), ROWS)),
               min_size=4, max_size=20)


@settings(max_examples=40, deadline=None)
@given(ops=OPS, config=st.integers(0, len(CONFIGS) - 1))
def test_matches_reference_model(ops, config):
  """With room for every key: same sources, embeddings, ages, versions and counters after every
  operation, over TTL boundaries, duplicates within a batch, masked rows and expiry of rings."""
  cfg = CONFIGS[config]
  state = ERCacheState.create(cfg, FALLBACK)
  ref = Reference(cfg)
  now = 0
  for step, (op, arg) in enumerate(ops):
    if op == "advance":
      now += arg
      continue
    keys, valid, ok, emb = _device_batch(arg)
    if op == "lookup":
      state, served = ercache.lookup(state, keys, now, valid)
      _check(served, ref.lookup(arg, now))
    elif op == "failover":
      state, served = ercache.failover(state, keys, now, valid)
      _check(served, ref.failover(arg, now))
    elif op == "latest":
      state, served = ercache.latest(state, keys, now, valid)
      _check(served, ref.latest(arg, now))
    elif op == "write":
      state = ercache.write(state, keys, emb, now, step, valid)
      ref.write(arg, now, step)
    else:  # a request: lookup, then inference where needed (ok says whether it succeeded)
      state, looked = ercache.lookup(state, keys, now, valid)
      looked_ref = ref.lookup(arg, now)
      _check(looked, looked_ref)
      state, served = ercache.resolve_after_inference(state, keys, now, looked, emb, ok, step, valid)
      _check(served, ref.resolve(arg, now, looked_ref, step))
    assert read_counters(state) == ref.counters


@settings(max_examples=30, deadline=None)
@given(ops=OPS, m=st.integers(1, 2))
def test_under_eviction_every_hit_is_a_recent_mean_of_its_own_key(ops, m):
  """Tiers far smaller than the key set: a hit still serves that key's newest write (its age and
  version), as the mean of a suffix of at most m of its embeddings; counters add up."""
  cfg = _cfg(2, 6, m, cap=(3, 5), probes=(2, 3))
  state = ERCacheState.create(cfg, FALLBACK)
  hist: dict[int, list[tuple[np.ndarray, int, int]]] = {}  # key -> [(embedding, time, version)]
  now, rows_in = 0, {"direct": 0, "failover": 0, "written": 0}
  for step, (op, arg) in enumerate(ops):
    if op == "advance":
      now += arg
      continue
    keys, valid, _, emb = _device_batch(arg)
    if op in ("write", "infer"):
      state = ercache.write(state, keys, emb, now, step, valid)
      for k, v, _, e in arg:
        if v:
          hist.setdefault(k, []).append((e, now, step))
          rows_in["written"] += 1
      continue
    fn = ercache.lookup if op == "lookup" else ercache.failover if op == "failover" else ercache.latest
    state, served = fn(state, keys, now, valid)
    src, age, ver, out = jax.device_get((served.source, served.age, served.version, served.embedding))
    for i, (k, v, _, _) in enumerate(arg):
      if not v:
        continue
      rows_in["direct"] += op != "failover"
      rows_in["failover"] += op == "failover" or (op == "latest" and src[i] != Source.DIRECT)
      if src[i] in (Source.DIRECT, Source.FAILOVER):
        e_last, t_last, v_last = hist[k][-1]
        assert (age[i], ver[i]) == (now - t_last, v_last)
        means = [np.mean([e for e, _, _ in hist[k][-j:]], axis=0) for j in range(1, m + 1)]
        assert any(np.allclose(out[i], mu, rtol=1e-6) for mu in means), (k, out[i], means)
        assert age[i] < (cfg.direct_ttl_s if src[i] == Source.DIRECT else cfg.failover_ttl_s)
      else:
        np.testing.assert_array_equal(out[i], FALLBACK)
  c = read_counters(state)
  assert c["direct_hits"] + c["direct_misses"] == rows_in["direct"]
  assert c["failover_hits"] + c["failover_misses"] == rows_in["failover"]
  assert c["writes"] == rows_in["written"]
  assert c["direct_evictions"] <= c["writes"] and c["failover_evictions"] <= c["writes"]
  for tier in (state.direct, state.failover):  # each occupied slot holds a distinct key that was written
    held = held_keys(tier)
    assert len(set(held)) == len(held) and set(held) <= set(hist)


@settings(max_examples=30, deadline=None)
@given(batches=st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 9), min_size=1, max_size=B)),
                        min_size=1, max_size=10))
def test_full_window_eviction_keeps_the_newest_writes(batches):
  """With a probe window as large as the tier, the tier holds exactly the min(C, #keys) keys
  written last: every evicted key was written no later than every kept one."""
  cfg = _cfg(100, 100, 1, cap=(4, 6))
  state = ERCacheState.create(cfg)
  last: dict[int, int] = {}
  now = 0
  for dt, ks in batches:
    now += dt
    keys, valid, _, emb = _device_batch([(k, True, True, np.ones(D, np.float32)) for k in ks])
    state = ercache.write(state, keys, emb, now, 0, valid)
    last.update({k: now for k in ks})
    for tier, cap in (("direct", 4), ("failover", 6)):
      present = _present(getattr(state, tier), *split_keys(list(range(10))))
      kept = {k for k in last if present[k]}
      assert len(kept) == min(cap, len(last))
      gone = set(last) - kept
      assert all(last[g] <= last[k] for g in gone for k in kept)


@jax.jit
def _present(table, hi, lo):
  return probe(table, hi, lo)[1]


def test_failover_semantics_at_the_ttl_boundaries():
  cfg = dataclasses.replace(_cfg(60, 600, 1), direct_capacity=16, failover_capacity=16)
  state = ERCacheState.create(cfg, FALLBACK)
  ids = split_keys([42])
  e = jnp.asarray([[1.0, 2.0, 3.0]])
  state = ercache.write(state, ids, e, 100, 7)

  def request(state, now, ok):
    state, looked = ercache.lookup(state, ids, now)
    return ercache.resolve_after_inference(state, ids, now, looked, e * 2, jnp.asarray([ok]), 8)

  state, s = request(state, 159, ok=False)  # younger than the direct TTL: inference skipped
  assert (Source(int(s.source[0])), int(s.age[0]), int(s.version[0])) == (Source.DIRECT, 59, 7)
  state, s = request(state, 160, ok=False)  # at the direct TTL, inference failed: failover tier
  assert (Source(int(s.source[0])), int(s.age[0])) == (Source.FAILOVER, 60)
  np.testing.assert_array_equal(s.embedding, e)
  state, s = request(state, 699, ok=False)
  assert Source(int(s.source[0])) == Source.FAILOVER
  state, s = request(state, 700, ok=False)  # at the failover TTL: the default embedding
  assert (Source(int(s.source[0])), int(s.age[0]), int(s.version[0])) == (Source.FALLBACK, -1, -1)
  np.testing.assert_array_equal(s.embedding[0], FALLBACK)
  state, s = request(state, 701, ok=True)  # inference succeeds: served fresh and cached
  assert (Source(int(s.source[0])), int(s.age[0]), int(s.version[0])) == (Source.FRESH, 0, 8)
  state, s = request(state, 702, ok=False)
  assert (Source(int(s.source[0])), int(s.age[0])) == (Source.DIRECT, 1)
  np.testing.assert_array_equal(s.embedding, e * 2)
  c = read_counters(state)
  assert (c["direct_hits"], c["direct_misses"], c["fresh"], c["inference_failures"]) == (2, 4, 1, 3)
  assert (c["failover_hits"], c["fallbacks"], c["writes"]) == (2, 1, 2)


def test_stabilization_averages_the_last_m_and_restarts_after_the_failover_ttl():
  cfg = dataclasses.replace(_cfg(10, 50, 3), direct_capacity=16, failover_capacity=16)
  state = ERCacheState.create(cfg)
  ids = split_keys([5])
  served = []
  for i, t in enumerate([0, 20, 40, 60, 200]):  # the last write comes after the ring expired
    state = ercache.write(state, ids, jnp.full((1, D), 3.0 * (i + 1)), t, i)
    state, s = ercache.lookup(state, ids, t)
    served.append(float(s.embedding[0, 0]))
  assert served == pytest.approx([3.0, 4.5, 6.0, 9.0, 15.0])  # means of [3], [3,6], [3,6,9], [6,9,12], [15]


def test_bfloat16_values_and_config_errors():
  cfg = _cfg(5, 10, 2, "bfloat16", cap=(8, 8))
  state = ERCacheState.create(cfg)
  assert state.direct.values.dtype == jnp.bfloat16 and state.failover.values.shape == (8, 2 * D)
  state = ercache.write(state, split_keys([1]), jnp.full((1, D), 1.0 / 3), 0, 0)
  state, s = ercache.lookup(state, split_keys([1]), 0)
  assert s.embedding.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(s.embedding, np.float32), 1.0 / 3, rtol=2 ** -8)
  with pytest.raises(ValueError, match="direct_ttl_s <= failover_ttl_s"):
    ERCacheConfig(direct_ttl_s=10, failover_ttl_s=5)
  with pytest.raises(ValueError, match="dtype"):
    ERCacheConfig(dtype="float16")
  with pytest.raises(ValueError, match="stabilize_m"):
    ERCacheConfig(stabilize_m=0)
  with pytest.raises(ValueError, match="fallback"):
    ERCacheState.create(ERCacheConfig(dim=4), jnp.zeros(3))
  with pytest.raises(ValueError, match="embeddings must be"):
    ercache.write(ERCacheState.create(cfg), split_keys([1]), jnp.zeros((1, D + 1)), 0, 0)


def test_request_path_compiles_without_host_transfers():
  """Each entry point lowers to one XLA computation (no callbacks): nothing leaves the device."""
  cfg = CONFIGS[1]
  state = ERCacheState.create(cfg)
  keys, valid, ok, emb = _device_batch([(1, True, True, np.ones(D, np.float32))])
  for fn, args in [(ercache.lookup, (keys, 0, valid)), (ercache.latest, (keys, 0, valid)),
                   (ercache.failover, (keys, 0, valid)), (ercache.write, (keys, emb, 0, 1, valid))]:
    text = fn.lower(state, *args).as_text()
    assert "callback" not in text and "infeed" not in text and "outfeed" not in text, fn.__name__


def test_docstring_example():
  result = doctest.testmod(ercache, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_tiers_are_updated_in_place():
  """The state is donated: a write or a lookup reuses the tiers' buffers instead of copying them."""
  state = ERCacheState.create(_cfg(5, 10, 2, cap=(64, 128), probes=(8, 8)))
  pointers = [x.unsafe_buffer_pointer() for x in (state.direct.values, state.failover.values)]
  keys, valid, _, emb = _device_batch([(1, True, True, np.ones(D, np.float32))])
  state = ercache.write(state, keys, emb, 0, 1, valid)
  state, _ = ercache.latest(state, keys, 1, valid)
  assert [x.unsafe_buffer_pointer() for x in (state.direct.values, state.failover.values)] == pointers


def test_evictions_are_counted_per_tier():
  """A small direct tier evicts, a large failover tier does not: each counter its own tier's."""
  state = ERCacheState.create(_cfg(5, 10, 1, cap=(2, 16)))
  keys, valid, _, emb = _device_batch([(k, True, True, np.ones(D, np.float32)) for k in range(5)])
  state = ercache.write(state, keys, emb, 0, 1, valid)
  c = read_counters(state)
  assert (c["direct_evictions"], c["failover_evictions"]) == (3, 0)


def test_a_write_stamped_after_the_lookup_clock_serves_age_zero():
  """A refresh written (clock t + 1) between a request's clock read (t) and its lookup is served
  with age 0, not -1 (the 'no embedding' marker)."""
  state = ERCacheState.create(CONFIGS[1], FALLBACK)
  keys, valid, _, emb = _device_batch([(1, True, True, np.ones(D, np.float32))])
  state = ercache.write(state, keys, emb, 101, 1, valid)
  state, direct = ercache.lookup(state, keys, 100, valid)
  state, stale = ercache.failover(state, keys, 100, valid)
  assert (Source(int(direct.source[0])), int(direct.age[0])) == (Source.DIRECT, 0)
  assert (Source(int(stale.source[0])), int(stale.age[0])) == (Source.FAILOVER, 0)


def test_a_write_at_exactly_the_failover_ttl_starts_a_new_ring():
  """A ring whose newest write is failover_ttl_s old has expired (the failover tier no longer serves
  it): the next write starts a new history rather than averaging the expired embedding in. One second
  younger, the write extends it."""
  cfg = dataclasses.replace(_cfg(10, 50, 2), direct_capacity=16, failover_capacity=16)
  ids = split_keys([5])
  for gap, want in ((50, 6.0), (49, 4.5)):  # means of [6] and of [3, 6]
    state = ERCacheState.create(cfg)
    state = ercache.write(state, ids, jnp.full((1, D), 3.0), 0, 0)
    state = ercache.write(state, ids, jnp.full((1, D), 6.0), gap, 1)
    state, s = ercache.lookup(state, ids, gap)
    assert Source(int(s.source[0])) == Source.DIRECT
    assert float(s.embedding[0, 0]) == pytest.approx(want), gap


def test_counters_carry_past_2_to_the_32():
  """A request-rate counter passes 2**32 in days: the state's counters are 64-bit (u32 hi, lo with a
  carry), not u32 scalars that wrap to small values."""
  state = ERCacheState.create(_cfg(2, 5, 1))
  near = jnp.asarray([0, 2**32 - 2], jnp.uint32)
  state = state.replace(counters={**state.counters, "direct_misses": near,
                                  "writes": jnp.asarray([7, 2**32 - 1], jnp.uint32)})
  state, _ = ercache.lookup(state, split_keys(np.arange(4, dtype=np.int64)), 10)
  state = ercache.write(state, split_keys(np.arange(4, dtype=np.int64)), jnp.ones((4, D)), 10, 1)
  c = read_counters(state)
  assert c["direct_misses"] == 2**32 + 2
  assert c["writes"] == (8 << 32) + 3
  assert c["direct_hits"] == 0
