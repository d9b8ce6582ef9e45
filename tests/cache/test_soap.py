"""SOAP: the request path never waits for the user model; the worker refreshes, stabilizes, drains."""

import dataclasses
import threading
import time

import numpy as np
import pytest

from jaxrec.cache import ERCacheConfig, ERCacheState, SoapCache, SoapConfig, Source
from jaxrec.cache.soap import bucket, usable

D = 4
CFG = ERCacheConfig(dim=D, direct_ttl_s=10, failover_ttl_s=1000, direct_capacity=64, failover_capacity=128,
                    stabilize_m=3)
SOAP = SoapConfig(max_batch=8, max_wait_s=0.001, queue_size=64, min_bucket=8)
FALLBACK = np.full(D, -1.0, np.float32)


class Clock:
  def __init__(self):
    self.now = 0

  def __call__(self) -> int:
    return self.now


def embed(version):
  """A user model of `version`: user u -> [u + version] * D."""
  return lambda ids: np.repeat((ids.astype(np.float32) + version)[:, None], D, axis=1)


def _soap(model, clock=None, config=SOAP, **kw):
  return SoapCache(ERCacheState.create(CFG, FALLBACK), model, config, clock=clock or Clock(), **kw)


def _sources(served):
  return [Source(int(s)).name for s in np.asarray(served.source)]


def test_serve_never_waits_for_a_stuck_user_model_and_writes_back_when_it_returns():
  release, entered = threading.Event(), threading.Event()

  def slow(ids):
    entered.set()
    assert release.wait(10), "test never released the user model"
    return embed(0)(ids)

  with _soap(slow) as soap:
    soap.serve([1, 2])
    assert entered.wait(5)  # the worker is now inside the user model
    t0 = time.perf_counter()
    for _ in range(5):
      served = soap.serve([1, 2, 3])
      np.asarray(served.embedding)  # materialized: the device work is done too
    assert time.perf_counter() - t0 < 2.0
    assert _sources(served) == ["FALLBACK"] * 3
    np.testing.assert_array_equal(np.asarray(served.embedding), np.tile(FALLBACK, (3, 1)))
    release.set()
    assert soap.wait_idle(10)
    served = soap.serve([1, 2, 3])
    assert _sources(served) == ["DIRECT"] * 3
    np.testing.assert_array_equal(np.asarray(served.embedding)[:, 0], [1, 2, 3])
    c = soap.counters()
  assert c["refresh_written"] == 3 and c["direct_hits"] == 3 and c["refresh_failures"] == 0
  # users 1 and 2 were queued six times and 3 five times while the model was stuck: computed once each
  assert c["refresh_requested"] == 17 and c["refresh_skipped"] == 14


def test_stale_users_get_the_failover_tier_while_the_refresh_runs():
  clock = Clock()
  with _soap(embed(0), clock) as soap:
    soap.serve([7])
    assert soap.wait_idle(5)
    clock.now = 50  # past the direct TTL, inside the failover TTL
    soap.set_user_model(embed(100), version=1)
    served = soap.serve([7])
    assert _sources(served) == ["FAILOVER"] and int(served.age[0]) == 50 and int(served.version[0]) == 0
    assert soap.wait_idle(5)
    served = soap.serve([7])
    assert _sources(served) == ["DIRECT"] and int(served.version[0]) == 1


def test_stabilization_serves_the_mean_of_the_last_m_versions():
  clock = Clock()
  with _soap(embed(0), clock) as soap:
    got = []
    for version in range(5):  # a new user-model version per refresh; each refresh after the TTL
      soap.set_user_model(embed(10 * version), version)
      soap.serve([1])
      assert soap.wait_idle(5)
      got.append(float(soap.serve([1]).embedding[0, 0]))
      clock.now += CFG.direct_ttl_s
  # user 1 under versions 0, 10, 20, ...: means of the last min(n, 3): 1, 6, 11, 21, 31
  assert got == pytest.approx([1.0, 6.0, 11.0, 21.0, 31.0])


def test_a_failing_user_model_is_counted_and_the_failover_tier_covers():
  clock = Clock()
  calls = []

  def flaky(ids):
    calls.append(ids.tolist())
    if len(calls) > 1:
      raise RuntimeError("user model down")
    return embed(0)(ids)

  with _soap(flaky, clock) as soap:
    soap.serve([1])
    assert soap.wait_idle(5)
    clock.now = 20
    assert _sources(soap.serve([1, 2])) == ["FAILOVER", "FALLBACK"]
    assert soap.wait_idle(5)
    assert _sources(soap.serve([1, 2])) == ["FAILOVER", "FALLBACK"]  # retried on the next request
    assert soap.wait_idle(5)
    c = soap.counters()
    assert c["refresh_failures"] == 4 and c["refresh_failed_batches"] == 2 and c["refresh_written"] == 1
    assert "user model down" in soap.last_error
    soap.set_user_model(lambda ids: np.zeros((len(ids), D + 1)), version=1)  # a wrong shape fails too
    soap.serve([3])
    assert soap.wait_idle(5)
    assert soap.counters()["refresh_failures"] == 5 and "want [8, 4]" in soap.last_error
    soap.set_user_model(embed(0), version=2)  # the worker survived all of it
    soap.serve([2])
    assert soap.wait_idle(5)
    assert soap.last_error is None  # it describes the last attempt, which succeeded
    assert _sources(soap.serve([2])) == ["DIRECT"]


def test_close_drains_queued_refreshes_or_discards_them():
  for drain in (True, False):
    release = threading.Event()
    written = []

    def slow(ids):
      release.wait(10)
      written.extend(ids.tolist())
      return embed(0)(ids)

    soap = _soap(slow, config=SoapConfig(max_batch=2, max_wait_s=0.0, queue_size=64)).start()
    for u in range(6):  # the first batch blocks in the model; the rest wait in the queue
      soap.serve([u])
    time.sleep(0.05)
    threading.Timer(0.1, release.set).start()
    assert soap.close(drain=drain, timeout=10)
    c = soap.counters()
    if drain:
      assert set(written) == set(range(6)) and c["refresh_written"] == 6
    else:
      assert len(set(written)) < 6 and c["refresh_dropped"] >= 1
      assert c["refresh_written"] + c["refresh_dropped"] == 6  # in flight, else discarded: none lost
    assert _sources(soap.serve([99])) == ["FALLBACK"]  # closed: still serves, queues nothing
    assert soap.counters()["refresh_dropped"] == c["refresh_dropped"] + 1


def test_a_full_queue_drops_refreshes_instead_of_blocking():
  release = threading.Event()
  soap = _soap(lambda ids: (release.wait(10), embed(0)(ids))[1],
               config=SoapConfig(max_batch=1, max_wait_s=0.0, queue_size=2)).start()
  t0 = time.perf_counter()
  for u in range(10):
    soap.serve([u])
  assert time.perf_counter() - t0 < 2.0
  release.set()
  assert soap.close(timeout=10)
  c = soap.counters()
  assert c["refresh_dropped"] >= 10 - 2 - 2 and c["refresh_enqueued"] + c["refresh_dropped"] == 10


def test_buckets_and_config():
  assert [bucket(n, 8) for n in (0, 1, 8, 9, 16, 17)] == [8, 8, 8, 16, 16, 32]
  with pytest.raises(ValueError):
    SoapConfig(max_batch=0)
  with pytest.raises(RuntimeError, match="already started"):
    with _soap(embed(0)) as soap:
      soap.start()


def test_a_non_finite_or_out_of_range_embedding_is_never_written():
  """A user model returning NaN / inf, or values beyond max_abs, for some users (extreme request
  features) must not poison the cache: those users are counted as failures and keep their previous
  tier; the others are written."""
  def odd(ids):
    out = embed(0)(ids)
    out[ids == 1] = np.nan
    out[ids == 3, 0] = np.inf
    out[ids == 4, 2] = -1e6
    return out

  with _soap(odd, config=dataclasses.replace(SOAP, max_abs=1e3)) as soap:
    assert _sources(soap.serve([1, 2, 3, 4, 5])) == ["FALLBACK"] * 5
    assert soap.wait_idle(5)
    c = soap.counters()
    assert c["refresh_failures"] == 3 and c["refresh_written"] == 2 and "beyond |1000|" in soap.last_error
    served = soap.serve([1, 2, 3, 4, 5])
    assert _sources(served) == ["FALLBACK", "DIRECT", "FALLBACK", "FALLBACK", "DIRECT"]
    assert np.isfinite(np.asarray(served.embedding)).all() and np.abs(np.asarray(served.embedding)).max() == 5
    assert soap.wait_idle(5)  # the three failed users were queued again, and fail again
    c = soap.counters()
    assert c["refresh_failures"] == 6 and c["refresh_written"] == 2


def test_usable_rows():
  e = np.array([[0, 1], [np.nan, 0], [0, -np.inf], [100, -100], [0, 100.5]], np.float32)
  assert usable(e).tolist() == [True, False, False, True, True]
  assert usable(e, 100).tolist() == [True, False, False, True, False]
  with pytest.raises(ValueError, match="bad SoapConfig"):
    SoapConfig(max_abs=0)


def test_a_refresh_that_races_with_close_is_dropped_not_left_pending():
  """A request that passed the closed check just before close() ended must not leave a refresh that
  no worker takes (wait_idle would never return)."""
  soap = _soap(embed(0)).start(warmup=False)
  soap.close()
  passed_check = iter([False])  # the first check (before the put) still saw it open
  soap._closed.is_set = lambda: next(passed_check, True)
  soap.enqueue(np.array([5], np.int64), np.array([Source.FALLBACK]))
  assert soap.wait_idle(2)
  assert soap.counters()["refresh_dropped"] == 1


def test_a_refresh_is_tagged_with_the_version_of_the_model_that_computed_it():
  """A model swapped in while a refresh runs does not relabel that refresh: its embeddings carry the
  version of the model that computed them."""
  soap = None

  def old_model(ids):
    soap.set_user_model(embed(100), version=2)  # the swap lands while this call runs
    return embed(0)(ids)

  with _soap(old_model, version=1) as soap:
    soap.serve([7])
    assert soap.wait_idle(5)
    served = soap.serve([7])
  assert _sources(served) == ["DIRECT"]
  assert (float(served.embedding[0, 0]), int(served.version[0])) == (7.0, 1)
