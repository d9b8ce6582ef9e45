"""The device hash table against a Python dict model under random interleaved operations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrec.cache import HashTable, insert, lookup, probe, ring_mean, split_keys

KEYS = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
SMALL_KEYS = st.integers(min_value=0, max_value=40)  # many duplicates and collisions
OPS = st.lists(st.tuples(st.sampled_from(["insert", "lookup"]), st.lists(st.one_of(KEYS, SMALL_KEYS),
                                                                            min_size=1, max_size=12)),
               min_size=1, max_size=12)


def held_keys(t: HashTable) -> list[int]:
  """The int64 keys of the table's occupied slots, in slot order (split_keys inverted)."""
  occupied = np.asarray(t.write_time) >= 0
  hi, lo = np.asarray(t.key_hi)[occupied].astype(np.uint64), np.asarray(t.key_lo)[occupied].astype(np.uint64)
  return ((hi << np.uint64(32)) | lo).view(np.int64).tolist()


def _vals(keys, step):
  """Rows that differ between duplicates of a batch too (so which of them wins is checked)."""
  return jnp.asarray([[float(k % 1000), float(16 * step + i)] for i, k in enumerate(keys)], jnp.float32)


@settings(max_examples=40, deadline=None)
@given(ops=OPS, ttl=st.integers(0, 5))
def test_matches_dict_when_capacity_suffices(ops, ttl):
  """With room for every key, the table is a dict with TTL: same hits, same values."""
  t = HashTable.create(capacity=512, dim=2, max_probes=512)
  model: dict[int, tuple[np.ndarray, int]] = {}
  for now, (op, keys) in enumerate(ops):
    hi, lo = split_keys(keys)
    if op == "insert":
      vals = _vals(keys, now)
      t, _ = insert(t, hi, lo, vals, jnp.int32(now), jnp.int32(1))
      for k, v in zip(keys, np.asarray(vals)):
        model[k] = (v, now)  # later duplicates overwrite earlier ones
    else:
      found, rows, age = lookup(t, hi, lo, jnp.int32(now), jnp.int32(ttl))
      for i, k in enumerate(keys):
        want = k in model and now - model[k][1] <= ttl
        assert bool(found[i]) == want, (k, now)
        if want:
          np.testing.assert_array_equal(rows[i], model[k][0])
          assert int(age[i]) == now - model[k][1]


@settings(max_examples=40, deadline=None)
@given(ops=OPS)
def test_full_table_never_returns_another_keys_value(ops):
  """Under eviction pressure a hit still returns exactly the last value written for that key."""
  t = HashTable.create(capacity=8, dim=2, max_probes=4)
  last: dict[int, np.ndarray] = {}
  for now, (op, keys) in enumerate(ops):
    hi, lo = split_keys(keys)
    if op == "insert":
      vals = _vals(keys, now)
      t, stats = insert(t, hi, lo, vals, jnp.int32(now), jnp.int32(1))
      assert int(stats["updated"] + stats["inserted"] + stats["evicted"]) == len(keys)
      for k, v in zip(keys, np.asarray(vals)):
        last[k] = v
    else:
      found, rows, _ = lookup(t, hi, lo, jnp.int32(now), jnp.int32(10 ** 6))
      for i, k in enumerate(keys):
        if bool(found[i]):
          np.testing.assert_array_equal(rows[i], last[k])
  # The final table: each occupied slot holds a distinct key that was inserted, with its last value.
  held = held_keys(t)
  assert len(set(held)) == len(held) and set(held) <= set(last)
  for k, v in zip(held, np.asarray(t.values)[np.asarray(t.write_time) >= 0]):
    np.testing.assert_array_equal(v, last[k])


def test_eviction_takes_the_oldest_and_is_counted():
  t = HashTable.create(capacity=4, dim=1, max_probes=4)
  for now, k in enumerate([1, 2, 3, 4]):
    hi, lo = split_keys([k])
    t, s = insert(t, hi, lo, jnp.ones((1, 1)) * k, jnp.int32(now), jnp.int32(0))
    assert int(s["inserted"]) == 1
  hi, lo = split_keys([5])
  t, s = insert(t, hi, lo, jnp.ones((1, 1)) * 5, jnp.int32(10), jnp.int32(0))
  assert int(s["evicted"]) == 1
  found, _, _ = lookup(t, *split_keys([1, 2, 3, 4, 5]), jnp.int32(10), jnp.int32(100))
  assert list(np.asarray(found)) == [False, True, True, True, True]  # key 1 was the oldest


def test_bad_sizes_are_clear():
  with pytest.raises(ValueError, match="capacity and dim"):
    HashTable.create(0, 4)
  with pytest.raises(ValueError, match="max_probes"):
    HashTable.create(4, 4, max_probes=9)


RING_OPS = st.lists(st.tuples(st.integers(0, 3),  # time advance
                              st.lists(st.tuples(SMALL_KEYS.filter(lambda k: k < 6), st.booleans()),
                                       min_size=1, max_size=6)),
                    min_size=1, max_size=10)


@settings(max_examples=25, deadline=None)
@given(ops=RING_OPS, ring=st.integers(1, 3), restart=st.integers(0, 4))
def test_ring_valid_and_restart_match_a_dict_model(ops, ring, restart):
  """ring=m appends each written value to the key's last-m history (oldest dropped), a masked row
  writes nothing, and an entry older than restart_age starts a new history."""
  t = HashTable.create(capacity=64, dim=2 * ring, max_probes=64)
  hist: dict[int, tuple[list[np.ndarray], int]] = {}
  now = 0
  for step, (dt, rows) in enumerate(ops):
    now += dt
    keys = [k for k, _ in rows] + [0] * (6 - len(rows))  # fixed batch of 6: padding is masked
    valid = [v for _, v in rows] + [False] * (6 - len(rows))
    vals = np.asarray([[k + 1, step] for k in keys], np.float32)
    t, stats = insert(t, *split_keys(keys), jnp.asarray(vals), jnp.int32(now), jnp.int32(step),
                      jnp.asarray(valid), ring=ring, restart_age=jnp.int32(restart))
    assert int(stats["updated"] + stats["inserted"] + stats["evicted"]) == sum(valid)
    for k, v, ok in zip(keys, vals, valid):
      if ok:
        old, t_old = hist.get(k, ([], now))
        hist[k] = ((old if now - t_old <= restart else []) + [v], now)
    got = _read_rings(t, *split_keys(list(hist) + [0] * (12 - len(hist))), ring)  # fixed [12]
    present, means, writes, times = (np.asarray(x) for x in got)
    for i, (k, (h, t_k)) in enumerate(hist.items()):
      assert present[i]
      np.testing.assert_allclose(means[i], np.mean(h[-ring:], axis=0), rtol=1e-6)  # XLA may use a reciprocal
      assert writes[i] == len(h) and times[i] == t_k


@functools.partial(jax.jit, static_argnames="ring")
def _read_rings(t, hi, lo, ring):
  slot, present = probe(t, hi, lo)
  return present, ring_mean(t.values[slot], t.writes[slot], ring), t.writes[slot], t.write_time[slot]


def test_ring_width_must_divide_the_row():
  t = HashTable.create(capacity=4, dim=6, max_probes=4)
  with pytest.raises(ValueError, match="ring=4"):
    insert(t, *split_keys([1]), jnp.ones((1, 2)), jnp.int32(0), jnp.int32(0), ring=4)


def test_keys_differing_only_in_one_half_or_equal_to_sentinels_never_share_a_row():
  """int64 ids are not truncated: ids equal in their low (or high) 32 bits, 0, -1 and the int64
  extremes are distinct keys; a duplicate within a batch ends with its last row."""
  ks = [0, -1, 1, 2 ** 32, 2 ** 32 + 1, -(2 ** 32) + 1, 1 << 31, -(1 << 31), -(2 ** 63), 2 ** 63 - 1, 7, 7]
  t = HashTable.create(capacity=16, dim=1, max_probes=16)
  vals = jnp.arange(len(ks), dtype=jnp.float32)[:, None]
  t, s = insert(t, *split_keys(ks), vals, jnp.int32(3), jnp.int32(0))
  assert (int(s["inserted"]), int(s["updated"]), int(s["evicted"])) == (11, 1, 0)
  found, rows, _ = lookup(t, *split_keys(ks), jnp.int32(3), jnp.int32(0))
  assert np.asarray(found).all()
  assert np.asarray(rows)[:, 0].tolist() == list(range(len(ks) - 2)) + [11, 11]


def test_a_small_probe_window_still_holds_a_quarter_full_table():
  """The hash spreads keys over the table: 64 keys (sequential ids and ids apart only in their
  high half) fit in 256 slots with windows of 8, none evicted."""
  ks = list(range(32)) + [i << 32 for i in range(1, 33)]
  t = HashTable.create(capacity=256, dim=1, max_probes=8)
  t, s = insert(t, *split_keys(ks), jnp.ones((64, 1)), jnp.int32(0), jnp.int32(0))
  assert (int(s["inserted"]), int(s["evicted"])) == (64, 0)


@pytest.mark.parametrize("now", [-1, 0])
def test_any_clock_time_is_a_write(now):
  """A write at any time (-1 included) is found: the free-slot marker is no time a clock gives."""
  t = HashTable.create(capacity=4, dim=1, max_probes=4)
  t, _ = insert(t, *split_keys([9, 10]), jnp.ones((2, 1)), jnp.int32(now), jnp.int32(0))
  found, _, age = lookup(t, *split_keys([9, 10]), jnp.int32(now), jnp.int32(0))
  assert np.asarray(found).tolist() == [True, True] and np.asarray(age).tolist() == [0, 0]
