"""The device hash table against a Python dict model under random interleaved operations."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrec.cache import HashTable, insert, lookup, split_keys

KEYS = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
SMALL_KEYS = st.integers(min_value=0, max_value=40)  # many duplicates and collisions
OPS = st.lists(st.tuples(st.sampled_from(["insert", "lookup"]), st.lists(st.one_of(KEYS, SMALL_KEYS),
                                                                            min_size=1, max_size=12)),
               min_size=1, max_size=12)


def _vals(keys, step):
  return jnp.asarray([[float(k % 1000), float(step)] for k in keys], jnp.float32)


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
  assert int(jnp.sum(t.write_time >= 0)) <= 8


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
