"""serve.workers: HTTP worker processes in front of one engine process.

In-process: the Bridge and EngineLink over a real Unix socket (rank, errors through the future, a
lost engine process); the encoder split and the metrics merge. End to end: `python -m serve
--workers 2` as a subprocess (scores equal the engine's, errors, /metrics summed over the
workers, admin reload, SIGTERM drain, and workers that stop when the engine process is killed).
"""

import concurrent.futures
import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from serve.engine import EngineClosed, Overloaded
from serve.metrics import AGE_BUCKETS_S, LATENCY_BUCKETS_S, HttpMetrics
from serve.registry import Registry, UnknownModel
from serve.request import RankRequest, RequestError
from serve.app import HttpConfig
from serve.workers import Bridge, EngineLink, RemoteRegistry, listen, start_workers
from tests.serve.test_engine import SMALL, SMOKE
from tests.serve.test_loadgen import kill_server, start_server
from train import ranker

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("workers") / "runs"
  assert ranker.main(["--workdir", str(root / "tiny")] + SMOKE) == 0
  return root


@pytest.fixture(scope="module")
def registry(run_root):
  reg = Registry.open({"tiny": run_root / "tiny"}, SMALL)
  yield reg
  reg.close()


def _request(registry, n: int = 5, seed: int = 0) -> RankRequest:
  ex = registry.engines["tiny"].example_request()
  cands = [ex["candidates"][i % len(ex["candidates"])] for i in range(n)]
  return RankRequest(features=ex["features"], candidates=cands, user_id=seed)


# ---- in-process


def test_encoder_is_plain_data_and_matches_submit(registry):
  eng = registry.engines["tiny"]
  enc = pickle.loads(pickle.dumps(eng.encoder()))
  req = _request(registry, 7)
  a = eng.submit(req).result(30)
  b = eng.submit_encoded(enc.encode(req)).result(30)
  for t in a.scores:
    np.testing.assert_array_equal(a.scores[t], b.scores[t])
  with pytest.raises(RequestError, match="candidates"):
    enc.encode(RankRequest(features={}, candidates=[{"nope": 1}]))


def test_metrics_merge_sums_counts_and_histograms():
  a, b = HttpMetrics(), HttpMetrics()
  a.observe("/v1/rank", "m", 200, 0.004)
  b.observe("/v1/rank", "m", 200, 0.2)
  b.observe("/v1/rank", "m", 503, 0.001)
  b.observe_user_embedding("m", 30.0)
  merged = HttpMetrics.merged([a.snapshot(), b.snapshot()]).snapshot()
  assert merged["counts"] == {("/v1/rank", "m", 200): 2, ("/v1/rank", "m", 503): 1}
  counts, total = merged["latency"][("/v1/rank", "m")]
  # LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, ...): bounds are inclusive
  want = [0] * (len(LATENCY_BUCKETS_S) + 1)
  want[0], want[2], want[7] = 1, 1, 1  # 0.001 (on the bound), 0.004, 0.2
  assert counts == want and total == pytest.approx(0.205)
  age = [0] * (len(AGE_BUCKETS_S) + 1)
  age[3] = 1  # 30 s: above 15, at most 60
  assert merged["age"]["m"][0] == age


def test_bridge_keeps_each_workers_newest_metrics_snapshot(registry):
  """A worker's periodic push and the snapshot sent with a /metrics call are stored on different
  threads: one arriving late must not replace a newer one (the counters would go backwards)."""
  bridge = Bridge(registry, num_workers=2)
  try:
    old, new = HttpMetrics(), HttpMetrics()
    old.observe("/v1/rank", "tiny", 200, 0.01)
    for _ in range(3):
      new.observe("/v1/rank", "tiny", 200, 0.01)
    bridge._keep_newest(0, (5, new.snapshot()))
    http, _ = bridge._do_metrics(0, (4, old.snapshot()))  # sent before seq 5, stored after it
    assert http["counts"] == {("/v1/rank", "tiny", 200): 3}
    http, _ = bridge._do_metrics(1, (0, old.snapshot()))  # another worker's counts add up
    assert http["counts"] == {("/v1/rank", "tiny", 200): 4}
  finally:
    bridge.close()


def test_bridge_and_link_rank_and_map_errors(registry):
  bridge = Bridge(registry, num_workers=1)
  try:
    link = EngineLink(bridge.address, bridge.authkey)
    remote = RemoteRegistry(link, link.call("hello"))
    assert remote.names == ["tiny"] and bridge.wait_for_workers(5, alive=lambda: True)
    req = _request(registry, 9)
    got = remote.get("tiny").submit(req).result(30)
    want = registry.engines["tiny"].rank(req, 30)
    for t in want.scores:
      np.testing.assert_array_equal(got.scores[t], want.scores[t])
    assert got.model_version == want.model_version
    futures = [remote.get("tiny").submit(_request(registry, 3, s)) for s in range(20)]  # concurrent
    assert all(f.result(30).scores["click"].shape == (3,) for f in futures)
    assert remote.get("tiny").describe() == registry.engines["tiny"].describe()
    assert remote.get("tiny").example_request() == registry.engines["tiny"].example_request()
    with pytest.raises(UnknownModel):
      remote.get("nope")
    with pytest.raises(RequestError):  # validated in the worker, never sent
      remote.get("tiny").submit(RankRequest(features={"nope": 1.0}, candidates=[{}]))
    with pytest.raises(ValueError, match="unknown engine call"):
      link.call("close")
    # an engine-side error comes back through the future
    fut = link.request("rank", "nope", None)
    with pytest.raises(UnknownModel):
      fut.result(10)
    # the engine process going away fails what is pending and what comes next
    slow = threading.Event()
    real = registry.engines["tiny"].submit_encoded

    def hold(enc):  # a request the engine never answers
      slow.set()
      return concurrent.futures.Future()

    registry.engines["tiny"].submit_encoded = hold
    try:
      pending = remote.get("tiny").submit(req)
      assert slow.wait(10)
    finally:
      registry.engines["tiny"].submit_encoded = real
    bridge.close()
    with pytest.raises(EngineClosed, match="engine process is gone"):
      pending.result(10)
    with pytest.raises(EngineClosed):
      remote.get("tiny").submit(req)
  finally:
    bridge.close()


def test_engine_refusals_reach_the_worker_as_such(registry, monkeypatch):
  bridge = Bridge(registry, num_workers=1)
  try:
    link = EngineLink(bridge.address, bridge.authkey)
    remote = RemoteRegistry(link, link.call("hello"))
    eng = registry.engines["tiny"]
    for exc in (Overloaded("request queue full (8 waiting)"), EngineClosed("not running")):
      def refuse(enc, exc=exc):
        raise exc
      monkeypatch.setattr(eng, "submit_encoded", refuse)
      with pytest.raises(type(exc), match=str(exc)[:10]):
        remote.get("tiny").submit(_request(registry)).result(10)
  finally:
    bridge.close()


class _GoneAfterHello(Bridge):
  """A bridge whose engine process 'dies' just after answering a worker's hello, while the worker
  is still building its app (before its HTTP server exists)."""

  def _call(self, out, rid, method, args):
    if method != "hello":
      return super()._call(out, rid, method, args)
    [conn] = self._conns
    conn.send(("done", rid, self._do_hello(), None))  # the answer is in the socket (no other sender yet) ...
    self.close()  # ... and right behind it, the end of the connection


def test_a_worker_exits_when_its_engine_goes_away_while_it_starts(registry, capfd):
  """The worker used to miss this (its lost-engine callback found no server yet to stop) and then
  served forever, holding the port and its parent's stderr pipe: a killed server never ended."""
  bridge, sock = _GoneAfterHello(registry, num_workers=1), listen("127.0.0.1", 0)
  try:
    [proc] = start_workers(bridge, sock, 1, http=HttpConfig(), admin_token=None, log_level="warning",
                           loop="asyncio", drain_timeout_s=5.0)
    proc.join(90)
    kept_serving = proc.is_alive()
    if kept_serving:
      proc.kill()
      proc.join(10)
  finally:
    sock.close()
    bridge.close()
  assert not kept_serving, "the worker kept serving after its engine process went away"
  assert proc.exitcode == 1
  assert "the engine process went away while this worker started" in capfd.readouterr().err


# ---- end to end


def _start(run_root, *extra):
  return start_server(["--workdir", str(run_root), "--workers", "2", "--engine.buckets", "8,32,64",
                       "--engine.max_rows", "64", "--engine.max_candidates", "48", *extra], timeout_s=180)


def _get(url: str) -> dict:
  with urllib.request.urlopen(url, timeout=30) as r:
    return json.loads(r.read())


def _post(url: str, body: dict) -> tuple[int, dict]:
  req = urllib.request.Request(url + "/v1/rank", json.dumps(body).encode(), {"content-type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    with e:
      return e.code, json.loads(e.read())


def _stderr_until(proc: subprocess.Popen, marker: str) -> str:
  """The server's stderr up to and including the first line holding `marker`; fails on end of file."""
  lines = []
  while marker not in (line := proc.stderr.readline()):
    if not line:
      pytest.fail(f"the server never printed {marker!r}: {''.join(lines)}{kill_server(proc)}")
    lines.append(line)
  return "".join(lines) + line


@pytest.fixture(scope="module")
def server(run_root):
  proc, url, port = _start(run_root, "--admin_token", TOKEN)
  # /healthz answers once one worker serves; a SIGTERM before the other has connected stops the server
  # while it starts, unannounced. Tests begin after "serving ... with 2 HTTP worker processes".
  started = _stderr_until(proc, "HTTP worker processes")
  yield proc, url, started
  if proc.poll() is None:
    kill_server(proc)


def test_workers_serve_rank_errors_metrics_and_reload(server, registry):
  proc, url, _ = server
  example = _get(url + "/v1/models/tiny/example")
  status, reply = _post(url, example)
  assert status == 200, reply
  req = RankRequest(features=example["features"], candidates=[c["features"] for c in example["candidates"]],
                    user_id=example.get("user_id"))
  want = registry.engines["tiny"].rank(req, 30).scores["click"]
  np.testing.assert_allclose([c["scores"]["click"] for c in reply["candidates"]], want, rtol=1e-6)
  assert _post(url, {**example, "model": "nope"})[0] == 404
  assert _post(url, {**example, "candidates": 3})[0] == 422
  bad = {**example, "candidates": [{"item_id": 0, "features": {"nope": 1.0}}]}
  status, err = _post(url, bad)
  assert status == 422 and "nope" in err["error"]["message"]
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # new connections, spread over the workers
    codes = list(pool.map(lambda _: _post(url, example)[0], range(64)))
  assert codes == [200] * 64
  time.sleep(1.5)  # every worker has pushed its counters
  with urllib.request.urlopen(url + "/metrics") as r:
    text = r.read().decode()
  ok = [line for line in text.splitlines() if line.startswith('jaxrec_http_requests_total{path="/v1/rank",model="tiny",code="200"}')]
  assert ok and float(ok[0].split()[-1]) == 65  # summed over both workers
  engine = [line for line in text.splitlines() if line.startswith('jaxrec_engine_requests_total{model="tiny"}')]
  assert float(engine[0].split()[-1]) >= 65
  r = urllib.request.Request(url + "/admin/reload", b"", {"authorization": f"Bearer {TOKEN}"}, method="POST")
  with urllib.request.urlopen(r, timeout=120) as resp:
    assert json.loads(resp.read())["reloaded"]
  r = urllib.request.Request(url + "/admin/reload", b"", {"authorization": "Bearer wrong"}, method="POST")
  with pytest.raises(urllib.error.HTTPError) as info:
    urllib.request.urlopen(r)
  assert info.value.code == 401
  info.value.close()
  assert _post(url, example)[0] == 200


def test_sigterm_drains_workers_then_engines(server):
  proc, _, started = server
  proc.send_signal(signal.SIGTERM)
  err = started + proc.communicate(timeout=90)[1]
  assert proc.returncode == 0, err
  assert "with 2 HTTP worker processes" in err and "drained and stopped" in err and "Traceback" not in err


def test_workers_stop_when_the_engine_process_dies(run_root):
  proc, url, port = _start(run_root)
  kill_server(proc, timeout_s=30)  # no chance to forward a signal; fails if the workers outlive it
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline:
    with socket.socket() as s:
      if s.connect_ex(("127.0.0.1", port)) != 0:
        return  # nobody holds the port any more
    time.sleep(0.3)
  pytest.fail("the worker processes kept the port after the engine process died")


def test_bad_worker_count_is_a_clear_error():
  # a cold `python -m serve` imports jax, flax and fastapi first: ~7 s on an idle 2-core machine, over
  # 60 s when it is loaded several times over (seen), hence the generous limit
  out = subprocess.run([sys.executable, "-m", "serve", "--workers", "0"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "workers must be in [1, 64]" in out.stderr and "Traceback" not in out.stderr
  out = subprocess.run([sys.executable, "-m", "serve", "--port", "99999"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "port must be in [0, 65535]" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_a_clear_error(run_root, workers):
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  taken.listen(1)
  try:
    port = str(taken.getsockname()[1])
    out = subprocess.run([sys.executable, "-m", "serve", "--workdir", str(run_root), "--port", port,
                          "--workers", workers, "--engine.buckets", "8", "--engine.max_rows", "8",
                          "--engine.max_candidates", "8"], capture_output=True, text=True, timeout=180)
  finally:
    taken.close()
  assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
  assert "Traceback" not in out.stderr and "serving" not in out.stderr


def test_stopping_closes_the_engines_listening_socket_before_the_workers_drain():
  """While the engine process kept its copy of the listening socket open, the kernel went on completing
  connections into the backlog that no stopping worker would accept, and reset them at the end (clients
  saw 'connection reset' after ~150 ms instead of a refusal they can retry at once)."""
  from serve.workers import _stop
  sock = listen("127.0.0.1", 0)
  port = sock.getsockname()[1]
  worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  during_drain = []

  class Worker:  # a multiprocessing.Process whose drain (join) tries a new connection
    name, pid = "serve-worker-0", worker.pid

    def is_alive(self):
      return worker.poll() is None

    def join(self, timeout=None):
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        during_drain.append("accepted into the backlog")
      except ConnectionRefusedError:
        during_drain.append("refused")
      worker.wait(timeout)

    def kill(self):
      worker.kill()

  try:
    _stop([Worker()], drain_timeout_s=5.0, sock=sock)
  finally:
    worker.kill()
    worker.wait()
    sock.close()
  assert during_drain == ["refused"] and worker.returncode == -signal.SIGTERM
