"""serve.engine with a SUM ranker (SOAP mode): cached user embeddings on the request path, refreshed off it."""

import dataclasses
import json
import threading
import time

import jax
import jax.monitoring
import numpy as np
import pytest

from jaxrec.data.batch import batch_from_numpy
from jaxrec.training.user_model import load_user_model, train_user_model
from serve import metrics
from serve.engine import Engine, EngineConfig, load_ranker, open_engine
from serve.metrics import HttpMetrics
from serve.request import RankRequest, RequestError, concat_rows
from serve.user_embedding import UserCacheConfig
from tests.serve.test_engine import SMOKE as RANKER_SMOKE
from train import ranker
from train import user_model as train_user
from train.probe import load_run

CACHE = UserCacheConfig(direct_ttl_s=60, failover_ttl_s=3600, direct_capacity=64, failover_capacity=128,
                        refresh_batch=16, refresh_wait_ms=1.0)
SMALL = EngineConfig(buckets=(8, 32), max_rows=32, max_wait_ms=1.0, max_candidates=16, user_cache=CACHE)
CONTEXT = {"user_id", "user_segment", "user_activity", "device", "hour", "hour_sin", "hour_cos", "domain"}
HIST = {"hist_ads", "hist_advertisers", "hist_categories", "hist_log_impressions", "hist_log_clicks", "hist_ctr_logit"}


def train_sum(root, ranker_args=()):
  """(user-model workdir, ranker workdir): a tiny user tower (10 steps) and a ranker on its embeddings."""
  user_dir, ranker_dir = root / "user", root / "ranker"
  train_user_model(train_user.smoke(), user_dir)
  assert ranker.main(["--workdir", str(ranker_dir), "--data.user_model", str(user_dir)] + RANKER_SMOKE
                     + list(ranker_args)) == 0
  return user_dir, ranker_dir


class FakeClock:
  """clock() -> int seconds, moved by hand."""

  def __init__(self, t: int = 1000):
    self.t = t

  def __call__(self) -> int:
    return self.t


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  return train_sum(tmp_path_factory.mktemp("serve_sum"))


@pytest.fixture(scope="module")
def clock():
  return FakeClock()


@pytest.fixture(scope="module")
def engine(dirs, clock):
  eng = open_engine(dirs[1], SMALL, clock=clock).start()
  yield eng
  eng.close()


def make_reference(user_dir, ranker_dir):
  """scores(request, emb=None) -> (probs [N, T], emb [D]): the ranker with the user's tower embedding
  (`emb`, default: the tower run on the request's features), newest checkpoints of both, run outside
  the engine; `scores.embedding(features)` is the embedding alone."""
  tower = load_user_model(user_dir)
  _, model, _ = load_run(ranker_dir)
  rschema = json.loads((ranker_dir / "schema.json").read_text())
  rdense, rsparse = rschema["dense"], [f["name"] for f in rschema["sparse"]]

  def tower_embedding(features):
    s = tower.schema
    dense = np.zeros((1, s.num_dense), np.float32)
    sparse = np.zeros((1, s.num_sparse, s.max_len), np.int32)
    mask = np.zeros(sparse.shape, bool)
    for name, v in features.items():
      if name in s.dense:
        dense[0, s.dense.index(name)] = v
      elif name in [f.name for f in s.sparse]:
        j = [f.name for f in s.sparse].index(name)
        ids = v if isinstance(v, list) else [v]
        sparse[0, j, :len(ids)], mask[0, j, :len(ids)] = ids, True
    batch = batch_from_numpy(dense=dense, sparse=sparse, sparse_mask=mask, labels=np.zeros((1, 2)),
                             weights=np.ones(1), domain=np.zeros(1), timestamp=np.zeros(1))
    return tower.embed(batch)[0]

  def scores(req, emb=None):
    emb = tower_embedding(req.features) if emb is None else emb
    n = len(req.candidates)
    dense = np.zeros((n, len(rdense)), np.float32)
    sparse = np.zeros((n, len(rsparse), 1), np.int32)
    mask = np.zeros(sparse.shape, bool)
    for r, cand in enumerate(req.candidates):
      for name, v in {**req.features, **cand}.items():
        if name in rdense:
          dense[r, rdense.index(name)] = v
        elif name in rsparse:
          sparse[r, rsparse.index(name), 0], mask[r, rsparse.index(name), 0] = v, True
      dense[r, rdense.index("user_emb_0"):] = emb
    batch = batch_from_numpy(dense=dense, sparse=sparse, sparse_mask=mask, labels=np.zeros((n, 2)),
                             weights=np.ones(n), domain=np.zeros(n), timestamp=np.zeros(n))
    return np.asarray(jax.nn.sigmoid(model(jax.tree.map(jax.numpy.asarray, batch)))), emb

  scores.embedding = tower_embedding
  return scores


@pytest.fixture(scope="module")
def reference(dirs):
  return make_reference(*dirs)


def sum_request(engine, user, n, rng):
  """A request of `user` with every user, context and history feature set, and n candidates."""
  names = {f["name"]: f for f in engine.describe()["sparse"]}
  tower = engine.users.embedder.schema
  names.update({f.name: {"vocab_size": f.vocab_size, "max_len": f.max_len} for f in tower.sparse if f.name in HIST})
  dense = [n_ for n_ in engine.describe()["dense"] if not n_.startswith("user_emb_")] + [
      d for d in tower.dense if d in HIST]
  feats = {k: float(rng.normal()) for k in dense if k in CONTEXT | HIST}
  feats.update({k: (int(rng.integers(f["vocab_size"])) if f["max_len"] == 1 else
                    [int(i) for i in rng.integers(0, f["vocab_size"], size=int(rng.integers(1, f["max_len"] + 1)))])
                for k, f in names.items() if k in CONTEXT | HIST})
  feats["user_id"] = user
  cands = [{**{k: float(rng.normal()) for k in dense if k not in CONTEXT | HIST},
            **{k: int(rng.integers(f["vocab_size"])) for k, f in names.items() if k not in CONTEXT | HIST}}
           for _ in range(n)]
  return RankRequest(feats, cands, user_id=user)


def assert_scores(resp, expected):
  for i, t in enumerate(("click", "conversion")):
    np.testing.assert_allclose(resp.scores[t], expected[:, i], rtol=0, atol=1e-5, err_msg=t)


def test_fallback_then_direct_with_the_fresh_embedding(engine, reference, clock):
  rng = np.random.default_rng(0)
  req = sum_request(engine, 11, 5, rng)
  first = engine.rank(req, timeout=30)
  assert first.user_embedding.source == "fallback"
  assert (first.user_embedding.age_s, first.user_embedding.version) == (-1, -1)
  assert_scores(first, reference(req, emb=np.zeros(8, np.float32))[0])  # default embedding: zeros
  assert engine.users.soap.wait_idle(30)
  clock.t += 5
  again = engine.rank(req, timeout=30)
  assert again.user_embedding.source == "direct" and again.user_embedding.age_s == 5
  assert again.user_embedding.version == 10 and again.model_version == 4
  expected, emb = reference(req)
  assert np.abs(emb).max() > 0.1  # the tower's embedding is not the default
  assert_scores(again, expected)
  with pytest.raises(AssertionError):  # negative control: the fallback's scores are not these
    assert_scores(first, expected)


def test_rankers_of_one_user_model_share_its_cache(dirs, reference):
  """Two engines over rankers of the same user model (as serve.registry opens them): one cache and
  one refresh per user, whichever engine's request triggered it; the worker outlives the first close."""
  clock, shared = FakeClock(), {}
  a = open_engine(dirs[1], SMALL, clock=clock, shared_users=shared).start()
  b = open_engine(dirs[1], SMALL, clock=clock, shared_users=shared).start()
  try:
    assert a.users is b.users and a.users.holders == 2 and len(shared) == 1
    rng = np.random.default_rng(7)
    req = sum_request(a, 21, 3, rng)
    assert a.rank(req, timeout=30).user_embedding.source == "fallback"
    assert a.users.soap.wait_idle(30)
    clock.t += 1
    resp = b.rank(req, timeout=30)
    assert resp.user_embedding.source == "direct"  # refreshed by a's request: no second inference
    assert_scores(resp, reference(req)[0])
    assert b.stats()["user_embedding"]["cache"]["refresh_written"] == 1
    a.close()
    assert b.users.holders == 1
    other = sum_request(b, 22, 2, rng)
    assert b.rank(other, timeout=30).user_embedding.source == "fallback"
    assert b.users.soap.wait_idle(30)  # the worker still runs for b
    assert b.rank(other, timeout=30).user_embedding.source == "direct"
    other_cache = dataclasses.replace(SMALL, user_cache=dataclasses.replace(CACHE, direct_ttl_s=5))
    with pytest.raises(ValueError, match="share user model .* configure its cache"):
      open_engine(dirs[1], other_cache, clock=clock, shared_users=shared)
    a.close()  # a second close releases nothing
    assert b.users.holders == 1
  finally:
    a.close()
    b.close()
  assert b.users.holders == 0


def test_engine_serves_the_sources_the_replay_predicts(dirs):
  """serve.replay's SOAP mode is the engine's behaviour: a request stream through the engine (fake
  clock, each refresh written before the next request) gets, request by request, the sources that
  jaxrec.cache.replay computes for the same stream and cache settings."""
  from jaxrec.cache.ercache import Source
  from jaxrec.cache.replay import AccessStream, ReplayPolicy, replay
  rng = np.random.default_rng(3)
  n = 60
  users = rng.integers(100, 108, n)
  times = 5000 + np.cumsum(rng.choice([0, 5, 30, 70, 400, 4000], n))
  clock = FakeClock(int(times[0]))
  eng = open_engine(dirs[1], SMALL, clock=clock).start()
  try:
    got = []
    for u, t in zip(users.tolist(), times.tolist()):
      clock.t = t
      got.append(eng.rank(sum_request(eng, u, 2, rng), timeout=30).user_embedding.source)
      assert eng.users.soap.wait_idle(30)
  finally:
    eng.close()
  trace = replay(AccessStream(users.astype(np.int64), times.astype(np.int64)), np.zeros((n, 1), np.float32),
                 ReplayPolicy(direct_ttl_s=CACHE.direct_ttl_s, failover_ttl_s=CACHE.failover_ttl_s, soap=True))
  want = [Source(s).name.lower() for s in trace.source]
  assert got == want
  assert {"direct", "failover", "fallback"} <= set(got)  # the stream exercises every SOAP source


def test_direct_ttl_expiry_serves_failover_then_refreshes(engine, reference, clock):
  rng = np.random.default_rng(1)
  req = sum_request(engine, 12, 3, rng)
  engine.rank(req, timeout=30)
  assert engine.users.soap.wait_idle(30)
  assert engine.rank(req, timeout=30).user_embedding.source == "direct"
  clock.t += 60  # the direct TTL
  before = engine.stats()["user_embedding"]["cache"]["refresh_written"]
  stale = engine.rank(req, timeout=30)
  assert stale.user_embedding.source == "failover" and stale.user_embedding.age_s == 60
  assert_scores(stale, reference(req)[0])  # stale, but the same tower: the same embedding (m = 1)
  assert engine.users.soap.wait_idle(30)
  assert engine.stats()["user_embedding"]["cache"]["refresh_written"] == before + 1
  fresh = engine.rank(req, timeout=30)
  assert fresh.user_embedding.source == "direct" and fresh.user_embedding.age_s == 0
  clock.t += 3600  # past the failover TTL too: nothing usable
  assert engine.rank(req, timeout=30).user_embedding.source == "fallback"
  assert engine.users.soap.wait_idle(30)


def test_failing_user_model_serves_failover_or_fallback(engine, clock):
  rng = np.random.default_rng(2)
  known = sum_request(engine, 13, 2, rng)
  engine.rank(known, timeout=30)
  assert engine.users.soap.wait_idle(30)
  soap = engine.users.soap

  def broken(ids):
    raise RuntimeError("user model down")

  soap.set_user_model(broken, 99)
  try:
    clock.t += 61
    failures = engine.stats()["user_embedding"]["cache"]["refresh_failures"]
    for _ in range(3):  # keeps serving: stale for the known user, default for a new one
      assert engine.rank(known, timeout=30).user_embedding.source == "failover"
      assert engine.rank(sum_request(engine, 14, 2, rng), timeout=30).user_embedding.source == "fallback"
      assert soap.wait_idle(30)
    st = engine.stats()
    assert st["user_embedding"]["cache"]["refresh_failures"] > failures
    assert "user model down" in st["user_embedding"]["last_error"] and st["failed_batches"] == 0
  finally:
    engine.users.set_tower(engine.users.embedder.tower)  # the served tower again (recompiled)
  engine.rank(known, timeout=30)
  assert soap.wait_idle(30)
  assert engine.rank(known, timeout=30).user_embedding.source == "direct"


def test_no_compilation_after_start(dirs):
  compiles = []

  def on_event(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(threading.current_thread().name)

  rng = np.random.default_rng(3)
  clock = FakeClock()
  engine = open_engine(dirs[1], SMALL, clock=clock).start()
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for n in (1, 16):  # both buckets; one user refreshed (refresh batch 8)
      engine.rank(sum_request(engine, 20 + n, n, rng), timeout=30)
    assert engine.users.soap.wait_idle(30)
    futures = [engine.submit(sum_request(engine, 100 + u, 2, rng)) for u in range(12)]  # up to 12 users refreshed
    assert {f.result(timeout=30).user_embedding.source for f in futures} == {"fallback"}
    assert engine.users.soap.wait_idle(30)
    clock.t += 61
    futures = [engine.submit(sum_request(engine, 100 + u, 2, rng)) for u in range(12)]
    assert {f.result(timeout=30).user_embedding.source for f in futures} == {"failover"}
    assert engine.users.soap.wait_idle(30)
    engine.stats()
    assert compiles == [], f"compiled after start, on threads {compiles}"
    jax.jit(lambda x: x * 5 + 1)(np.ones(3, np.float32))  # negative control
    assert compiles
    # the step runs under the transfer guard: a ranker state left on the host is refused, not copied
    active = engine._active
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
      engine.users.run(active.compiled[8], jax.device_get(active.state), concat_rows([], engine.schema, 8), [], [], [])
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
    engine.close()


@pytest.mark.parametrize("user_id, features, candidates, match", [
    (None, {}, [{}], r"user_id: required"),
    (-3, {}, [{}], r"user_id: -3 out of range"),
    ("3", {}, [{}], r"user_id: must be an integer"),
    (3, {"user_emb_0": 0.5}, [{}], r"features\.user_emb_0: filled by the server"),
    (3, {}, [{"user_emb_7": 0.5}], r"candidates\[0\]\.user_emb_7: filled by the server"),
    (3, {"hist_ads": [1, 300]}, [{}], r"features\.hist_ads: id 300 out of range \[0, 299\]"),
    (3, {"hist_ads": list(range(9))}, [{}], r"features\.hist_ads: 9 ids, the feature holds at most 8"),
    (3, {"hist_ctr_logit": "x"}, [{}], r"features\.hist_ctr_logit: dense feature must be a number"),
    (3, {}, [{"hist_ads": 1}], r"candidates\[0\]\.hist_ads: unknown feature"),
    (3, {"user_id": 1000}, [{}], r"features\.user_id: id 1000 out of range"),
])
def test_validation_errors(engine, user_id, features, candidates, match):
  with pytest.raises(RequestError, match=match):
    engine.submit(RankRequest(features, candidates, user_id=user_id))


def test_describe_example_and_stats(engine, dirs):
  d = engine.describe()
  um = d["user_model"]
  assert um["version"] == 10 and um["embedding_dim"] == 8 and um["workdir"] == str(dirs[0])
  assert {"user_id", "user_segment", "user_activity", "hist_ads", "hist_ctr_logit"} <= set(um["features"])
  assert um["cache"]["direct_ttl_s"] == 60 and um["cache"]["stabilize_m"] == 1
  # what a client sends is listed with its type; the user_emb_* inputs the server fills are apart
  assert not any(n.startswith("user_emb_") for n in d["dense"]) and len(d["server_filled"]) == um["embedding_dim"]
  assert set(um["dense"]) | {f["name"] for f in um["sparse"]} == set(um["features"])
  hist_ads = next(f for f in um["sparse"] if f["name"] == "hist_ads")
  assert hist_ads["max_len"] > 1 and hist_ads["vocab_size"] > 0
  body = json.loads(json.dumps(engine.example_request()))
  assert isinstance(body["user_id"], int) and "hist_ads" in body["features"] and len(body["candidates"]) == 3
  assert not any(k.startswith("user_emb_") for k in [*body["features"], *body["candidates"][0]])
  resp = engine.rank(RankRequest(body["features"], body["candidates"], user_id=body["user_id"]), timeout=30)
  assert resp.user_embedding.source in ("fallback", "direct", "failover")
  st = json.loads(json.dumps(engine.stats()))
  assert st["user_model_version"] == 10 and sum(st["user_embedding"]["sources"].values()) >= 1
  assert {"direct_hits", "failover_hits", "refresh_written", "refresh_queued"} <= set(st["user_embedding"]["cache"])
  assert engine.users.soap.wait_idle(30)


def test_plain_engine_refuses_a_sum_ranker(dirs):
  with pytest.raises(ValueError, match="open_engine"):
    Engine(load_ranker(dirs[1]), SMALL)


# ---- sync mode: a direct-tier miss runs the user model for the request, within a deadline

SYNC = dataclasses.replace(SMALL, user_cache=dataclasses.replace(CACHE, mode="sync", sync_deadline_ms=1000.0))


class BrokenTower:
  """Stands in for the engine's TowerEmbedder: raises, or answers after `delay_s` (past the deadline)."""

  def __init__(self, real, delay_s=None):
    self.real, self.delay_s = real, delay_s

  def __getattr__(self, name):  # everything but embed: the real one's
    return getattr(self.real, name)

  def embed(self, rows):
    if self.delay_s is None:
      raise RuntimeError("user model down")
    time.sleep(self.delay_s)
    return self.real.embed(rows)


@pytest.fixture(scope="module")
def sync_clock():
  return FakeClock()


@pytest.fixture(scope="module")
def sync_engine(dirs, sync_clock):
  compiles = []

  def on_event(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration" and threading.current_thread().name != "MainThread":
      compiles.append(threading.current_thread().name)  # the serving threads (the tests' references compile)

  eng = open_engine(dirs[1], SYNC, clock=sync_clock).start()
  jax.monitoring.register_event_duration_secs_listener(on_event)
  yield eng, compiles
  jax.monitoring.unregister_event_duration_listener(on_event)
  eng.close()


def test_sync_miss_runs_the_user_model_for_the_request(sync_engine, reference, sync_clock):
  eng, compiles = sync_engine
  rng = np.random.default_rng(5)
  req = sum_request(eng, 41, 6, rng)
  first = eng.rank(req, timeout=30)
  assert (first.user_embedding.source, first.user_embedding.age_s, first.user_embedding.version) == ("fresh", 0, 10)
  assert_scores(first, reference(req)[0])
  sync_clock.t += 7
  hit = eng.rank(req, timeout=30)
  assert (hit.user_embedding.source, hit.user_embedding.age_s) == ("direct", 7)
  assert_scores(hit, reference(req)[0])
  sync_clock.t += 60
  assert eng.rank(req, timeout=30).user_embedding.source == "fresh"  # past the direct TTL: inferred again
  together = [eng.submit(sum_request(eng, 50 + u, 3, rng)) for u in range(9)]  # one batch of 27 rows: bucket 32
  assert {f.result(timeout=30).user_embedding.source for f in together} == {"fresh"}
  st = eng.stats()["user_embedding"]
  assert st["mode"] == "sync" and st["sync_inferences"] >= 3 and st["sync_timeouts"] == st["sync_errors"] == 0
  assert st["cache"]["refresh_enqueued"] == 0  # nothing goes to the background worker
  page = metrics.render(HttpMetrics(), {"sum": eng.stats()})  # sync mode's own counters are exported
  for key in ("sync_inferences", "sync_timeouts", "sync_errors", "sync_unusable"):
    assert f'jaxrec_cache_{key}_total{{model="sum"}} {st[key]}' in page
  assert compiles == [], f"compiled after start, on threads {compiles}"


@pytest.mark.parametrize("delay_s, counter", [(None, "sync_errors"), (1.5, "sync_timeouts")])
def test_sync_failing_or_slow_user_model_serves_failover_or_fallback(sync_engine, reference, sync_clock, delay_s,
                                                                     counter):
  eng, compiles = sync_engine
  rng = np.random.default_rng(6)
  known = sum_request(eng, 60 + int(delay_s or 0), 2, rng)
  assert eng.rank(known, timeout=30).user_embedding.source == "fresh"
  real = eng.users.embedder
  before = eng.stats()["user_embedding"][counter]
  eng.users.embedder = BrokenTower(real, delay_s)
  try:
    sync_clock.t += 61
    stale = eng.rank(known, timeout=30)
    assert (stale.user_embedding.source, stale.user_embedding.age_s) == ("failover", 61)
    assert_scores(stale, reference(known)[0])
    new = eng.rank(sum_request(eng, 70 + int(delay_s or 0), 2, rng), timeout=30)
    assert new.user_embedding.source == "fallback"
    assert eng.stats()["user_embedding"][counter] == before + 2
    assert eng.stats()["user_embedding"]["last_error"] is not None
  finally:
    eng.users.embedder = real
  if delay_s:
    time.sleep(delay_s)  # the slow calls still run, one after the other: let them finish
  assert eng.rank(known, timeout=30).user_embedding.source == "fresh"
  assert eng.stats()["user_embedding"]["last_error"] is None  # the last attempt succeeded
  assert eng.stats()["failed_batches"] == 0
  assert compiles == [], f"compiled after start, on threads {compiles}"


def test_sync_slow_user_model_calls_do_not_pile_up(sync_engine, reference):
  """A user model slower than the deadline: a batch's call that has not started when the batch stops
  waiting is dropped, so once the model is fast again a batch's call runs at once, not behind every
  earlier batch's slow call."""
  eng, compiles = sync_engine
  rng = np.random.default_rng(11)
  users = eng.users
  real, cfg = users.embedder, users.cfg
  users.embedder, users.cfg = BrokenTower(real, 0.6), dataclasses.replace(cfg, sync_deadline_ms=200.0)
  try:
    for u in range(6):  # 6 batches, each waiting 0.2 s for a 0.6 s call
      assert eng.rank(sum_request(eng, 90 + u, 2, rng), timeout=30).user_embedding.source == "fallback"
  finally:
    users.embedder, users.cfg = real, cfg
  time.sleep(0.6)  # the call running when the last batch gave up finishes
  req = sum_request(eng, 96, 2, rng)
  resp = eng.rank(req, timeout=30)
  assert resp.user_embedding.source == "fresh"  # within the deadline again (1 s)
  assert_scores(resp, reference(req)[0])
  assert compiles == [], f"compiled after start, on threads {compiles}"


def _extreme(req):
  """`req` with a user (tower) feature far outside the training data: the tower's embedding is finite
  but beyond max_abs_embedding (or NaN)."""
  return RankRequest({**req.features, "hist_log_impressions": 1e30}, req.candidates, user_id=req.user_id)


def test_extreme_user_features_never_poison_the_cache(engine, reference, clock):
  rng = np.random.default_rng(8)
  req = sum_request(engine, 15, 3, rng)  # a user no other test of the module's engine has sent
  soap = engine.users.soap
  failures = soap.counters()["refresh_failures"]
  assert engine.rank(_extreme(req), timeout=30).user_embedding.source == "fallback"
  assert soap.wait_idle(30)
  assert soap.counters()["refresh_failures"] == failures + 1 and "beyond |100|" in soap.last_error
  clock.t += 1
  assert engine.rank(req, timeout=30).user_embedding.source == "fallback"  # nothing was cached
  assert soap.wait_idle(30)
  clock.t += 1
  good = engine.rank(req, timeout=30)
  assert (good.user_embedding.source, good.user_embedding.age_s) == ("direct", 1)
  assert_scores(good, reference(req)[0])


def test_sync_extreme_user_features_are_neither_served_nor_cached(sync_engine, reference, sync_clock):
  eng, _ = sync_engine
  rng = np.random.default_rng(9)
  req = sum_request(eng, 80, 2, rng)
  before = eng.stats()["user_embedding"]["sync_unusable"]
  bad = eng.rank(_extreme(req), timeout=30)
  assert bad.user_embedding.source == "fallback" and np.isfinite(np.asarray(bad.scores["click"])).all()
  assert eng.stats()["user_embedding"]["sync_unusable"] == before + 1
  sync_clock.t += 1
  good = eng.rank(req, timeout=30)
  assert good.user_embedding.source == "fresh"  # not a direct hit on anything the extreme request left
  assert_scores(good, reference(req)[0])


def test_a_user_whose_features_were_dropped_fails_alone_not_the_whole_refresh(engine, reference, clock):
  """The refresh worker's user model over users of whom one has no kept features (more than
  max_users_kept waiting): that user's row is NaN (not written), the others are embedded."""
  rng = np.random.default_rng(10)
  req = sum_request(engine, 16, 2, rng)
  engine.rank(req, timeout=30)  # keeps user 16's features
  assert engine.users.soap.wait_idle(30)
  users = engine.users
  ids = np.array([16, 987_654] + [16] * 6, np.int64)  # 8: a compiled refresh bucket
  emb = np.asarray(users._user_model(users.embedder, ids))
  assert np.isnan(emb[1]).all() and np.isfinite(np.delete(emb, 1, axis=0)).all()
  np.testing.assert_allclose(emb[0], reference.embedding(req.features), rtol=0, atol=1e-5)
  assert np.isnan(np.asarray(users._user_model(users.embedder, np.array([987_654], np.int64)))).all()
