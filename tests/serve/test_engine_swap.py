"""serve.engine hot swap: a newer checkpoint replaces the served one under load, with zero failed requests."""

import dataclasses
import threading
import time

import jax
import jax.monitoring
import numpy as np
import pytest

from jaxrec.training.user_model import train_user_model
from serve.engine import EngineConfig, SwapError, load_ranker, open_engine
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
