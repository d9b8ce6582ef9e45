"""serve.engine hot swap: a newer checkpoint replaces the served one under load, with zero failed requests."""

import dataclasses
import shutil
import threading
import time

import jax
import jax.monitoring
import numpy as np
import pytest

from jaxrec.training.user_model import train_user_model
from serve.engine import EngineConfig, SwapError, load_ranker, open_engine
from serve.registry import Registry
from serve.user_embedding import UserCacheConfig
from tests.serve.test_engine import SMOKE, random_request
from tests.serve.test_engine_sum import RANKER_SMOKE, FakeClock, assert_scores, make_reference, sum_request, train_sum
from train import ranker
from train import user_model as train_user

SMALL = EngineConfig(buckets=(8, 32), max_rows=32, max_wait_ms=1.0, max_candidates=16)
SERVE_THREADS = ("jaxrec-serve-batcher", "soap-worker", "load")


class Load:
  """A thread that ranks `make(i)` requests back to back (up to 4 in flight) until stopped; records
  (response version, user-model version) in order and every exception."""

  def __init__(self, engine, make):
    self.engine, self.make = engine, make
    self.versions: list[tuple[int, int | None]] = []
    self.errors: list[BaseException] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="load", daemon=True)

  def _run(self):
    i = 0
    while not self._stop.is_set():
      futures = [self.engine.submit(self.make(i + k)) for k in range(4)]
      i += 4
      time.sleep(0.005)  # leave the CPU to the training that runs beside
      for f in futures:
        try:
          r = f.result(timeout=60)
          self.versions.append((r.model_version, None if r.user_embedding is None else r.user_embedding.version))
        except BaseException as e:  # noqa: BLE001 - recorded, asserted on
          self.errors.append(e)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join(60)

  def wait_for(self, pred, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
      if any(pred(v) for v in list(self.versions)):
        return True
      time.sleep(0.01)
    return False


@pytest.fixture
def compiles():
  """Thread names of every XLA compilation while the test runs."""
  names = []

  def on_event(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
      names.append(threading.current_thread().name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  yield names
  jax.monitoring.unregister_event_duration_listener(on_event)


def test_reload_under_load(tmp_path, compiles):
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd)] + SMOKE) == 0
  rng = np.random.default_rng(0)
  eng = open_engine(wd, SMALL).start()
  reqs = [random_request(eng.schema, n, rng)[0] for n in (1, 5, 16, 9)]
  try:
    with Load(eng, lambda i: reqs[i % len(reqs)]) as load:
      assert load.wait_for(lambda v: v[0] == 4)
      # 4 more training steps into the same workdir, while the engine serves
      assert ranker.main(["--workdir", str(wd)] + SMOKE[:-4] + ["--train.steps", "8", "--train.checkpoint_every", "4"]) == 0
      n_before = len(compiles)
      assert eng.reload() == {"version": 8, "user_model_version": None}
      assert len(compiles) > n_before  # the new state was compiled, by this thread
      assert load.wait_for(lambda v: v[0] == 8)
      n = len(load.versions)
      assert load.wait_for(lambda v: len(load.versions) > n + 8)
    assert load.errors == []
    versions = [v for v, _ in load.versions]
    assert versions[0] == 4 and versions[-1] == 8 and versions == sorted(versions), "went back to the old model"
    assert not [t for t in compiles if t in SERVE_THREADS], f"compiled on the request path: {compiles}"
    st = eng.stats()
    assert st["swaps"] == 1 and st["version"] == 8 and st["failed_batches"] == 0
    # a checkpoint of another model config is refused, and the engine keeps serving the old one
    other = tmp_path / "other"
    assert ranker.main(["--workdir", str(other)] + SMOKE[:6] + ["--model.dcnv2.embed_dim", "8",
                                                                "--model.dcnv2.top_mlp", "16"] + SMOKE[10:]) == 0
    with pytest.raises(SwapError, match="graph or parameter shapes differ"):
      eng.swap(load_ranker(other))
    assert eng.rank(reqs[0], timeout=30).model_version == 8
    assert (eng.stats()["swaps"], eng.stats()["failed_swaps"]) == (1, 1)
  finally:
    eng.close()


def test_reload_sum_under_load_stabilizes_across_user_models(tmp_path, compiles):
  user_dir, ranker_dir = train_sum(tmp_path)
  clock = FakeClock()
  cache = UserCacheConfig(direct_ttl_s=60, failover_ttl_s=3600, direct_capacity=64, failover_capacity=128,
                          stabilize_m=2, refresh_batch=16, refresh_wait_ms=1.0)
  eng = open_engine(ranker_dir, dataclasses.replace(SMALL, user_cache=cache), clock=clock).start()
  rng = np.random.default_rng(1)
  reqs = [sum_request(eng, 30 + u, n, rng) for u, n in enumerate((1, 4, 16, 7))]
  try:
    for r in reqs:
      eng.rank(r, timeout=30)
    assert eng.users.soap.wait_idle(30)
    # user model 10's embedding of user 31 (now: retraining rewrites the standardisation statistics)
    old_emb = make_reference(user_dir, ranker_dir).embedding(reqs[1].features)
    with Load(eng, lambda i: reqs[i % len(reqs)]) as load:
      assert load.wait_for(lambda v: v == (4, 10))  # served DIRECT, embeddings of user model 10
      tower = dataclasses.replace(train_user.smoke(), train=dataclasses.replace(train_user.smoke().train, steps=15))
      train_user_model(tower, user_dir)
      assert ranker.main(["--workdir", str(ranker_dir), "--data.user_model", str(user_dir)] + RANKER_SMOKE[:-4]
                         + ["--train.steps", "8", "--train.checkpoint_every", "4"]) == 0
      prepare, during_compile = eng._prepare, []

      def recording(*args, **kwargs):  # which user model refreshes while the new ranker compiles
        during_compile.append(eng.users.version)
        return prepare(*args, **kwargs)

      eng._prepare = recording
      assert eng.reload() == {"version": 8, "user_model_version": 15}
      del eng._prepare
      # the new user model was switched in with the new ranker, not before the ranker compiled (the
      # old ranker would have read its embeddings meanwhile)
      assert during_compile == [10]
      assert load.wait_for(lambda v: v == (8, 10))  # the new ranker; cached embeddings still of model 10
      clock.t += 60  # direct TTL: stale (failover) embeddings served while user model 15 refreshes them
      assert load.wait_for(lambda v: v == (8, 15))
      n = len(load.versions)
      assert load.wait_for(lambda v: len(load.versions) > n + 8)
    assert load.errors == []
    ranks = [v for v, _ in load.versions]
    assert ranks[0] == 4 and ranks[-1] == 8 and ranks == sorted(ranks)
    assert not [t for t in compiles if t in SERVE_THREADS], f"compiled on the request path: {compiles}"
    assert eng.users.soap.wait_idle(30)
    # stabilization (m = 2): the served embedding is the mean of user model 10's and 15's
    new = make_reference(user_dir, ranker_dir)
    resp = eng.rank(reqs[1], timeout=30)
    assert (resp.user_embedding.source, resp.user_embedding.version, resp.model_version) == ("direct", 15, 8)
    mean = (old_emb + new.embedding(reqs[1].features)) / 2
    assert_scores(resp, new(reqs[1], emb=mean)[0])
    with pytest.raises(AssertionError):  # negative control: not user model 15's embedding alone
      assert_scores(resp, new(reqs[1])[0])
    st = eng.stats()
    assert st["swaps"] == 1 and st["user_model_version"] == 15 and st["failed_batches"] == 0
  finally:
    eng.close()


def test_rankers_sharing_a_user_model_reload_and_close_together(tmp_path):
  """Two rankers served on one user model (one cache, one tower): reloading either reloads both,
  with the tower, switched together after both compiled; a lone Engine.reload is refused. A close
  that times out keeps the user model held until the batch worker stops; a start whose compile
  fails lets go of it."""
  user_dir, ranker_dir = train_sum(tmp_path)
  twin = tmp_path / "twin"
  shutil.copytree(ranker_dir, twin)
  cache = UserCacheConfig(direct_ttl_s=60, failover_ttl_s=3600, direct_capacity=64, failover_capacity=128)
  cfg = dataclasses.replace(SMALL, user_cache=cache)
  reg = Registry.open({"a": ranker_dir, "b": twin}, cfg)
  a, b = reg.get("a"), reg.get("b")
  rng = np.random.default_rng(4)
  gate = threading.Event()
  try:
    assert a.users is b.users and a.users.holders == 2
    tower = dataclasses.replace(train_user.smoke(), train=dataclasses.replace(train_user.smoke().train, steps=15))
    train_user_model(tower, user_dir)
    with pytest.raises(SwapError, match="shared with 1 other served ranker"):
      a.reload()
    assert a.users.version == 10 and a.stats()["failed_swaps"] == 1
    prepare, seen = {}, []
    for name, eng in (("a", a), ("b", b)):
      prepare[name] = eng._prepare

      def recording(*args, _name=name, **kwargs):  # the user model each ranker compiles under
        seen.append((_name, a.users.version))
        return prepare[_name](*args, **kwargs)

      eng._prepare = recording
    assert reg.reload("a") == {"a": {"version": 4, "user_model_version": 15},
                               "b": {"version": 4, "user_model_version": 15}}
    del a._prepare, b._prepare
    assert sorted(seen) == [("a", 10), ("b", 10)]  # both compiled before the tower was switched
    assert (a.stats()["swaps"], b.stats()["swaps"]) == (1, 1)
    assert b.rank(sum_request(b, 5, 3, rng), timeout=30).model_version == 4

    # close(timeout) while a batch runs: the user model stays held until the worker has stopped
    entered, run = threading.Event(), b._run

    def held(batch):
      entered.set()
      gate.wait(30)
      run(batch)

    b._run = held
    pending = b.submit(sum_request(b, 6, 2, rng))
    assert entered.wait(30)
    a.close()
    b.close(timeout=0.1)
    assert b._worker.is_alive() and b.users.holders == 1
    gate.set()
    assert pending.result(30).user_embedding.source in ("fallback", "failover", "direct")
    b._worker.join(30)
    assert b.users.holders == 0
  finally:
    gate.set()
    reg.close()

  # a start that fails to compile lets go of the user model (whose refresh worker would run on)
  eng = open_engine(ranker_dir, cfg)
  eng._prepare = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("RESOURCE_EXHAUSTED"))
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    eng.start()
  assert eng.users.holders == 0 and not eng.users.soap._thread.is_alive()
