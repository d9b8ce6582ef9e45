"""serve.engine: scores match the model, dynamic batching splits them back, no compiles after start."""

import dataclasses
import queue
import threading
import time

import jax
import jax.monitoring
import numpy as np
import pytest
from flax import nnx

from jaxrec.data.batch import batch_from_numpy
from serve.engine import Engine, EngineClosed, EngineConfig, Overloaded, _batch_bins, load_ranker
from serve.request import RankRequest, RequestError, concat_rows, empty_rows
from train import ranker
from train.probe import load_run

SMOKE = ["--data.batch_size", "64", "--data.eval_batch_size", "64", "--data.eval_examples", "128",
         "--model.dcnv2.embed_dim", "8", "--model.dcnv2.top_mlp", "32,16", "--no-train.progress",
         "--train.num_devices", "1", "--train.steps", "4", "--train.checkpoint_every", "4"]
SMALL = EngineConfig(buckets=(8, 32, 64), max_rows=64, max_wait_ms=1.0, max_candidates=48)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("serve") / "run"
  assert ranker.main(["--workdir", str(wd)] + SMOKE) == 0
  return wd


@pytest.fixture(scope="module")
def loaded(run_dir):
  return load_ranker(run_dir)


@pytest.fixture(scope="module")
def engine(loaded):
  eng = Engine(loaded, SMALL).start()
  yield eng
  eng.close()


@pytest.fixture(scope="module")
def reference(run_dir):
  """probs(rows) of the trained model, rebuilt by train.probe.load_run and run eagerly on whole rows."""
  _, model, _ = load_run(run_dir)

  def probs(dense, sparse, sparse_mask=None):
    n = dense.shape[0]
    mask = np.ones_like(sparse, bool) if sparse_mask is None else sparse_mask
    batch = batch_from_numpy(dense=dense, sparse=sparse, sparse_mask=mask,
                             labels=np.zeros((n, 2)), weights=np.ones(n), domain=np.zeros(n),
                             timestamp=np.zeros(n))
    return np.asarray(jax.nn.sigmoid(model(jax.tree.map(jax.numpy.asarray, batch))))

  return probs


def random_request(schema, n, rng):
  """A request with every feature set (user features shared, ad features per candidate), and its rows."""
  user = {"user_id", "user_segment", "user_activity", "device", "hour", "hour_sin", "hour_cos"}
  dense = rng.normal(size=(n, schema.num_dense)).astype(np.float32)
  sparse = np.stack([rng.integers(0, f.vocab_size, size=n) for f in schema.sparse], axis=1)[:, :, None]
  for j, name in enumerate(schema.dense):
    if name in user:
      dense[:, j] = dense[0, j]
  for j, f in enumerate(schema.sparse):
    if f.name in user:
      sparse[:, j] = sparse[0, j]
  shared = {**{k: float(dense[0, j]) for j, k in enumerate(schema.dense) if k in user},
            **{f.name: int(sparse[0, j, 0]) for j, f in enumerate(schema.sparse) if f.name in user}}
  cands = [{**{k: float(dense[r, j]) for j, k in enumerate(schema.dense) if k not in user},
            **{f.name: [int(sparse[r, j, 0])] for j, f in enumerate(schema.sparse) if f.name not in user}}
           for r in range(n)]
  return RankRequest(shared, cands), dense, sparse.astype(np.int32)


def expected_per_request(reference, reqs):
  """The reference scores of each (request, dense, sparse) in `reqs`, from one forward over all their rows."""
  probs = reference(np.concatenate([d for _, d, _ in reqs]), np.concatenate([s for _, _, s in reqs]))
  return np.split(probs, np.cumsum([d.shape[0] for _, d, _ in reqs])[:-1])


def assert_matches(resp, expected, labels):
  assert list(resp.scores) == list(labels)
  for i, t in enumerate(labels):
    assert resp.scores[t].shape == (expected.shape[0],)
    np.testing.assert_allclose(resp.scores[t], expected[:, i], rtol=0, atol=1e-5, err_msg=t)


def test_scores_match_direct_forward(engine, reference):
  rng = np.random.default_rng(0)
  req, dense, sparse = random_request(engine.schema, 20, rng)
  resp = engine.rank(req, timeout=30)
  assert resp.model_version == 4
  assert_matches(resp, reference(dense, sparse), engine.schema.labels)
  # negative control: a different candidate order gives different scores at the same positions
  perm = RankRequest(req.features, req.candidates[::-1])
  with pytest.raises(AssertionError):
    assert_matches(engine.rank(perm, timeout=30), reference(dense, sparse), engine.schema.labels)


def test_requests_of_different_sizes_batch_together(loaded, reference):
  rng = np.random.default_rng(1)
  with Engine(loaded, EngineConfig(buckets=(8, 32, 64), max_rows=64, max_wait_ms=300, max_candidates=48)) as eng:
    reqs = [random_request(eng.schema, n, rng) for n in (1, 3, 17, 9, 30)]  # 60 rows: one batch of 64
    futures = [eng.submit(r) for r, _, _ in reqs]
    resps = [f.result(timeout=30) for f in futures]
    assert eng.batches_run == {8: 0, 32: 0, 64: 1}
    for resp, expected in zip(resps, expected_per_request(reference, reqs)):
      assert_matches(resp, expected, eng.schema.labels)
    # more rows than max_rows: split over batches, still each request's own scores
    reqs = [random_request(eng.schema, n, rng) for n in (40, 30, 5)]
    resps = [f.result(timeout=30) for f in [eng.submit(r) for r, _, _ in reqs]]
    for resp, expected in zip(resps, expected_per_request(reference, reqs)):
      assert_matches(resp, expected, eng.schema.labels)
    assert sum(eng.batches_run.values()) >= 3


def test_requests_that_exactly_fill_max_rows_run_as_one_batch(loaded, reference):
  """A request that brings the batch to exactly max_rows joins it (it fits): 30 + 34 rows are one
  batch of the 64 bucket, not two of 32."""
  rng = np.random.default_rng(3)
  with Engine(loaded, EngineConfig(buckets=(8, 32, 64), max_rows=64, max_wait_ms=300, max_candidates=48)) as eng:
    reqs = [random_request(eng.schema, n, rng) for n in (30, 34)]
    resps = [f.result(timeout=30) for f in [eng.submit(r) for r, _, _ in reqs]]
    assert eng.batches_run == {8: 0, 32: 0, 64: 1}
    for resp, expected in zip(resps, expected_per_request(reference, reqs)):
      assert_matches(resp, expected, eng.schema.labels)


def test_padding_rows_never_leak(loaded):
  """The same request scores the same alone in the smallest bucket and next to another in the largest."""
  rng = np.random.default_rng(2)
  with Engine(loaded, EngineConfig(buckets=(8, 32, 64), max_rows=64, max_wait_ms=300, max_candidates=48)) as eng:
    req, _, _ = random_request(eng.schema, 5, rng)
    alone = eng.rank(req, timeout=30)  # 5 rows + 3 padding
    assert eng.batches_run == {8: 1, 32: 0, 64: 0}
    big, _, _ = random_request(eng.schema, 43, rng)
    fb, fs = eng.submit(big), eng.submit(req)  # 48 rows + 16 padding
    together, other = fs.result(timeout=30), fb.result(timeout=30)
    assert eng.batches_run == {8: 1, 32: 0, 64: 1}
  assert other.scores["click"].shape == (43,)
  for t in eng.schema.labels:
    assert alone.scores[t].shape == (5,) and np.all(np.isfinite(alone.scores[t]))
    np.testing.assert_allclose(together.scores[t], alone.scores[t], rtol=0, atol=1e-6)


def test_missing_features_are_empty_rows(engine, reference):
  """A request with no features scores exactly like the padding rows (zero dense, no ids): the
  model's forward over empty_rows, every task."""
  resp = engine.rank(RankRequest({}, [{}, {}]), timeout=30)
  rows = empty_rows(2, engine.schema)
  assert not rows.sparse_mask.any() and not rows.dense.any()
  assert_matches(resp, reference(rows.dense, rows.sparse, rows.sparse_mask), engine.schema.labels)
  # control: the same forward with every sparse slot on (id 0 present) scores differently
  with pytest.raises(AssertionError):
    assert_matches(resp, reference(rows.dense, rows.sparse), engine.schema.labels)


@pytest.mark.parametrize("features, candidates, match", [
    ({"nope": 1}, [{}], r"features\.nope: unknown feature"),
    ({}, [{"ad_price": "1.0"}], r"candidates\[0\]\.ad_price: dense feature must be a number, got str"),
    ({}, [{}, {"ad_price": float("nan")}], r"candidates\[1\]\.ad_price: dense feature must be finite"),
    ({"user_activity": float("inf")}, [{}], r"features\.user_activity: dense feature must be finite"),
    ({"user_activity": 1e308}, [{}], r"features\.user_activity: dense feature must be finite and within float32"),
    ({}, [{"ad_price": -10**400}], r"candidates\[0\]\.ad_price: dense feature must be finite and within float32"),
    ({"user_id": 1000}, [{}], r"features\.user_id: id 1000 out of range \[0, 999\]"),
    ({}, [{"ad_id": -1}], r"candidates\[0\]\.ad_id: id -1 out of range \[0, 299\]"),
    ({}, [{"ad_id": 1.5}], r"candidates\[0\]\.ad_id: sparse feature ids must be integers, got float"),
    ({}, [{"ad_id": [1, 2]}], r"candidates\[0\]\.ad_id: 2 ids, the feature holds at most 1"),
    ({}, [{}] * 49, r"candidates: 49 candidates, at most 48"),
    ({}, [], r"candidates: at least one"),
    ({}, ["ad"], r"candidates\[0\]: expected a dict"),
])
def test_validation_errors_name_the_field(engine, features, candidates, match):
  with pytest.raises(RequestError, match=match):
    engine.submit(RankRequest(features, candidates))


def test_no_compilation_after_start(loaded):
  compiles = []

  def on_event(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    with Engine(loaded, SMALL) as eng:
      assert len(compiles) >= len(SMALL.buckets)  # start() compiled every bucket
      n0 = len(compiles)
      rng = np.random.default_rng(3)
      for n in (1, 8, 9, 32, 33, 48):  # one at a time: every bucket runs
        eng.rank(random_request(eng.schema, n, rng)[0], timeout=30)
      assert all(eng.batches_run[b] > 0 for b in SMALL.buckets), eng.batches_run
      futures = [eng.submit(random_request(eng.schema, n, rng)[0]) for n in (1, 7, 31, 2, 48, 5)]  # a burst
      for f in futures:
        f.result(timeout=30)
      assert len(compiles) == n0, "the request path compiled"
      # negative control: the listener does see a compilation
      jax.jit(lambda x: x * 3 + 1)(np.ones(5, np.float32))
      assert len(compiles) > n0
      # the step runs under the transfer guard: a state left on the host is refused, not copied
      host = dataclasses.replace(eng._active, state=jax.device_get(eng._active.state))
      with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        eng._run_bucket(host, concat_rows([], eng.schema, 8), [])
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)


def gated(eng):
  """Makes the worker wait on the returned gate before each batch; `entered` is set when it waits."""
  gate, entered = threading.Event(), threading.Event()
  run = eng._run

  def blocked_run(batch):
    entered.set()
    gate.wait(30)
    run(batch)

  eng._run = blocked_run
  return gate, entered


def test_overload_raises_and_recovers(loaded):
  eng = Engine(loaded, EngineConfig(buckets=(8,), max_rows=8, max_wait_ms=0, max_queue=2, max_candidates=8)).start()
  try:
    gate, entered = gated(eng)
    req = RankRequest({}, [{"ad_id": 1}])
    first = eng.submit(req)
    assert entered.wait(10)
    queued = [eng.submit(req), eng.submit(req)]
    with pytest.raises(Overloaded, match="queue full"):
      eng.submit(req)
    gate.set()
    for f in [first] + queued:
      assert f.result(timeout=30).scores["click"].shape == (1,)
    assert eng.rank(req, timeout=30).model_version == 4  # accepts again once drained
  finally:
    eng.close()


def test_close_drains_in_flight_requests(loaded):
  eng = Engine(loaded, EngineConfig(buckets=(8,), max_rows=8, max_wait_ms=0, max_queue=16, max_candidates=8)).start()
  gate, entered = gated(eng)
  req = RankRequest({}, [{"ad_id": 2}, {"ad_id": 3}])
  futures = [eng.submit(req)]
  assert entered.wait(10)
  futures += [eng.submit(req) for _ in range(6)]
  threading.Timer(0.2, gate.set).start()
  t0 = time.monotonic()
  eng.close(drain=True, timeout=30)
  assert time.monotonic() - t0 >= 0.15  # close waited for the gated batches
  for f in futures:
    assert f.done() and f.result().scores["conversion"].shape == (2,)
  with pytest.raises(EngineClosed):
    eng.submit(req)


def test_close_drains_a_request_queued_as_the_worker_found_the_queue_empty(loaded):
  """close(drain=True) racing with submit: a request queued after the worker's wait on the empty
  queue timed out, and before close() set the stop flag, is still scored (not left queued)."""
  eng = Engine(loaded, EngineConfig(buckets=(8,), max_rows=8, max_wait_ms=0, max_queue=16, max_candidates=8)).start()
  req = RankRequest({}, [{"ad_id": 2}])
  closer = threading.Thread(target=eng.close, kwargs={"drain": True, "timeout": 30})
  raced, late, get = threading.Event(), [], eng._queue.get

  def get_then_race(*args, **kw):
    try:
      return get(*args, **kw)
    except queue.Empty:
      if not raced.is_set():  # between the worker's timeout and its look at the stop flag: submit, close()
        late.append(eng.submit(req))
        closer.start()
        assert eng._stop.wait(10)
        raced.set()
      raise

  eng._queue.get = get_then_race
  assert raced.wait(10)
  closer.join(30)
  assert late[0].result(timeout=5).scores["click"].shape == (1,)


def test_close_without_drain_fails_queued_requests(loaded):
  eng = Engine(loaded, EngineConfig(buckets=(8,), max_rows=8, max_wait_ms=0, max_queue=16, max_candidates=8)).start()
  gate, entered = gated(eng)
  req = RankRequest({}, [{"ad_id": 2}])
  first = eng.submit(req)
  assert entered.wait(10)
  queued = [eng.submit(req) for _ in range(3)]
  threading.Timer(0.2, gate.set).start()
  eng.close(drain=False, timeout=30)
  assert first.result(timeout=1).scores["click"].shape == (1,)  # in flight: finished
  for f in queued:
    with pytest.raises(EngineClosed, match="without draining"):
      f.result(timeout=1)


@pytest.mark.parametrize("user_id, match", [
    ("7", r"user_id: must be an integer, got str"),
    (True, r"user_id: must be an integer, got bool"),
    (-1, r"user_id: -1 out of range"),
    (2**63, r"user_id: 9223372036854775808 out of range"),
])
def test_bad_user_id_is_a_request_error(engine, user_id, match):
  with pytest.raises(RequestError, match=match):
    engine.submit(RankRequest({}, [{}], user_id=user_id))


def test_describe_example_and_stats_are_json(engine):
  import json
  d = engine.describe()
  assert d["version"] == 4 and d["objectives"] == ["click", "conversion"] and d["user_model"] is None
  assert d["max_candidates"] == 48 and {"name": "ad_id", "vocab_size": 300, "max_len": 1} in d["sparse"]
  body = json.loads(json.dumps(engine.example_request()))
  assert len(body["candidates"]) == 3 and "user_id" in body["features"] and "ad_id" in body["candidates"][0]
  resp = engine.rank(RankRequest(body["features"], body["candidates"]), timeout=30)
  assert resp.scores["click"].shape == (3,) and resp.user_embedding is None
  st = json.loads(json.dumps(engine.stats()))
  assert st["requests"] >= 1 and st["rows"] >= 3 and st["failed_batches"] == 0 and st["queue_depth"] == 0
  assert sum(st["batches"].values()) == sum(st["batch_requests_hist"].values()) >= 1
  engine.rank(RankRequest(body["features"], body["candidates"]), timeout=30)  # alone: a batch of one request
  after = engine.stats()["batch_requests_hist"]
  assert {k: after[k] - st["batch_requests_hist"][k] for k in after} == {k: int(k == "1") for k in after}


@pytest.mark.parametrize("n, bin_", [(1, "1"), (2, "2"), (3, "4"), (4, "4"), (5, "8"), (33, "64"), (64, "64")])
def test_batch_bins_are_the_power_of_two_at_or_above(n, bin_):
  assert _batch_bins(n) == bin_


@pytest.mark.parametrize("plan", ["uniform:fp8_row", "uniform:fp8_delayed"])
def test_fp8_ranker_serves_with_weights_quantized_once(tmp_path, plan):
  """A ranker trained under an FP8 plan: load_ranker quantizes its FP8 forward weights once
  (fp8_delayed sites keep their amax histories instead), and the engine's scores are those of the
  model's jitted per-call FP8 forward (train.probe.load_run). Jitted, not eager: XLA keeps bf16
  intermediates at higher precision inside one computation, which moves FP8 roundings (eager and
  jitted differ by up to 0.006 in probability here)."""
  wd = tmp_path / "fp8run"
  assert ranker.main(["--workdir", str(wd), "--model.precision_plan", plan, "--model.dcnv2.compute_dtype",
                      "bfloat16"] + SMOKE) == 0
  loaded = load_ranker(wd)
  leaves = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(loaded.state.params)}
  quantized = [k for k in leaves if "fp8_kernel" in k]
  if plan == "uniform:fp8_row":
    assert quantized and not loaded.state.fp8
  else:
    assert not quantized and jax.tree.leaves(loaded.state.fp8)
  rng = np.random.default_rng(5)
  with Engine(loaded, SMALL) as eng:
    req, dense, sparse = random_request(eng.schema, 20, rng)
    resp = eng.rank(req, timeout=30)
  want = jitted_probs(wd, dense, sparse)
  for i, t in enumerate(eng.schema.labels):
    np.testing.assert_allclose(resp.scores[t], want[:, i], rtol=0, atol=1e-5, err_msg=t)


def jitted_probs(wd, dense, sparse):
  """probs [N, T] of the run's model (train.probe.load_run) on these rows, one jitted forward."""
  _, model, _ = load_run(wd)
  n = dense.shape[0]
  batch = batch_from_numpy(dense=dense, sparse=sparse, sparse_mask=np.ones_like(sparse, bool), labels=np.zeros((n, 2)),
                           weights=np.ones(n), domain=np.zeros(n), timestamp=np.zeros(n))
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda st, b: jax.nn.sigmoid(nnx.merge(graphdef, st)(b)))(
      state, jax.tree.map(jax.numpy.asarray, batch)))


def test_fp8_tensor_ranker_scores_do_not_depend_on_the_batch(tmp_path):
  """fp8_tensor scales a GEMM's input by its amax, over a batch that of every request in it: the
  engine scales inputs per row instead, so a request scores the same alone and beside a request with
  far larger features (and within FP8 rounding of the model's own forward on its rows)."""
  wd = tmp_path / "fp8run"
  assert ranker.main(["--workdir", str(wd), "--model.precision_plan", "uniform:fp8_tensor",
                      "--model.dcnv2.compute_dtype", "bfloat16"] + SMOKE) == 0
  rng = np.random.default_rng(6)
  with Engine(load_ranker(wd), EngineConfig(buckets=(8, 32, 64), max_rows=64, max_wait_ms=300,
                                            max_candidates=48)) as eng:
    req, dense, sparse = random_request(eng.schema, 5, rng)
    alone = eng.rank(req, timeout=30)
    big, _, _ = random_request(eng.schema, 43, rng)
    big = RankRequest(big.features, [{**c, "ad_price": 1e4} for c in big.candidates])
    fb, fs = eng.submit(big), eng.submit(req)
    together = fs.result(timeout=30)
    assert fb.result(timeout=30).scores["click"].shape == (43,)
    assert eng.batches_run == {8: 1, 32: 0, 64: 1}
  want = jitted_probs(wd, dense, sparse)
  for i, t in enumerate(eng.schema.labels):
    np.testing.assert_allclose(together.scores[t], alone.scores[t], rtol=0, atol=1e-6, err_msg=t)
    np.testing.assert_allclose(alone.scores[t], want[:, i], rtol=0, atol=0.02, err_msg=t)
