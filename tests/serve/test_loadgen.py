"""serve.loadgen against `python -m serve` run as a subprocess on a free loopback port, which then
stops gracefully on SIGTERM."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from serve import loadgen
from tests.serve.test_engine import SMOKE
from train import ranker



def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(args: list[str], timeout_s: float = 120) -> tuple[subprocess.Popen, str, int]:
  """`python -m serve ARGS` on a free loopback port, once /healthz answers: (process, url, port)."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "serve", "--port", str(port), *args], stderr=subprocess.PIPE,
                          text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with urllib.request.urlopen(url + "/healthz", timeout=1):
        return proc, url, port
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"server did not start: {kill_server(proc)}")
      time.sleep(0.2)


def child_pids(pid: int) -> list[int]:
  """The processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
  out = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    with contextlib.suppress(OSError, ValueError, IndexError):
      if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # fields after "(comm)": state, ppid
        out.append(int(stat.parent.name))
  return out


def kill_server(proc: subprocess.Popen, timeout_s: float = 60) -> str:
  """SIGKILLs a `start_server` process and returns its stderr. Its HTTP worker processes hold the same
  pipe, so the read ends only once they have exited too (they stop when the engine process dies):
  if they outlive it by `timeout_s`, they are killed and the test fails instead of waiting forever."""
  workers = child_pids(proc.pid)
  proc.kill()
  try:
    return proc.communicate(timeout=timeout_s)[1]
  except subprocess.TimeoutExpired:
    for pid in workers:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    pytest.fail(f"worker processes {workers} were still running {timeout_s:.0f} s after their server was killed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("loadgen")
  assert ranker.main(["--workdir", str(root / "runs" / "tiny")] + SMOKE) == 0
  proc, url, _ = start_server(["--workdir", str(root / "runs"), "--engine.buckets", "8,64,256",
                               "--engine.max_rows", "256", "--engine.max_candidates", "64",
                               "--engine.max_queue", "8"])
  yield proc, url
  if proc.poll() is None:
    kill_server(proc)


def test_closed_loop_report_and_out_file(server, tmp_path, capsys):
  _, url = server
  out = tmp_path / "closed.json"
  assert loadgen.main(["--url", url, "--model", "tiny", "--concurrency", "4", "--duration", "2", "--warmup", "0.3",
                       "--candidates", "50", "--bodies", "8", "--out", str(out)]) == 0
  assert capsys.readouterr().out.startswith("closed c=4 50 cands: ")
  report = json.loads(out.read_text())
  assert report["status"] == {"200": report["answered"]} and report["errors"] == {}
  assert report["answered"] >= 10 and report["rps"] > 5 and report["dropped"] == 0
  assert 1.9 < report["wall_s"] < 10
  lat = report["latency_ms"]
  assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


def test_open_loop_caps_in_flight_and_counts_drops(server):
  _, url = server
  cfg = loadgen.LoadConfig(url=url, model="tiny", mode="open", rate=2000, concurrency=2, duration=1.0, warmup=0,
                           candidates=64, bodies=4)
  report = asyncio.run(loadgen.run_load(cfg))
  assert report["dropped"] > 0 and report["answered"] > 0  # 2 in flight cannot keep up with 2000/s
  assert report["sent"] == report["answered"] and set(report["status"]) <= {"200", "503"}


def test_refuses_bad_targets(server, capsys):
  _, url = server
  assert loadgen.main(["--url", "http://192.168.1.1:8000", "--duration", "1"]) == 2
  assert "not a loopback address" in capsys.readouterr().err
  assert loadgen.main(["--url", url, "--model", "nope", "--duration", "1"]) == 2
  assert "'nope' is not served" in capsys.readouterr().err
  assert loadgen.main(["--url", url, "--model", "tiny", "--candidates", "65", "--duration", "1"]) == 2
  assert "over the server's max_candidates 64" in capsys.readouterr().err


def test_sigterm_stops_the_server_gracefully(server):
  proc, _ = server
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  assert "serving ['tiny']" in err and "drained and stopped" in err and "Traceback" not in err


@contextlib.contextmanager
def stub_server(rank_status=lambda i: 200, rank_delay_s=lambda i: 0.0):
  """A stand-in for `python -m serve` on a free loopback port (aiohttp, in a thread): model "stub" with
  one sparse feature; POST /v1/rank number i answers rank_status(i) after rank_delay_s(i) s."""
  from aiohttp import web

  calls = []

  async def models(_):
    return web.json_response({"models": [{"name": "stub", "max_candidates": 8,
                                          "sparse": [{"name": "ad_id", "vocab_size": 10, "max_len": 1}]}]})

  async def example(_):
    return web.json_response({"features": {}, "candidates": [{"features": {"ad_id": 1}}]})

  async def rank(request):
    i = len(calls)
    calls.append(i)
    await request.read()
    await asyncio.sleep(rank_delay_s(i))
    return web.json_response({}, status=rank_status(i))

  app = web.Application()
  app.add_routes([web.get("/v1/models", models), web.get("/v1/models/stub/example", example),
                  web.post("/v1/rank", rank)])
  loop = asyncio.new_event_loop()
  runner = web.AppRunner(app)
  loop.run_until_complete(runner.setup())
  port = free_port()
  loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
  thread = threading.Thread(target=loop.run_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_open_loop_latency_counts_from_the_scheduled_send():
  # The generator stalls 0.4 s (as a busy client does): the arrivals due meanwhile go out late, and
  # their latency must include that wait (no coordinated omission), not start when they were sent.
  async def stalled(cfg):
    asyncio.get_running_loop().call_later(0.5, time.sleep, 0.4)
    return await loadgen.run_load(cfg)

  with stub_server() as url:
    cfg = loadgen.LoadConfig(url=url, model="stub", mode="open", rate=200, concurrency=64, duration=1.5, warmup=0,
                             candidates=1, bodies=2)
    report = asyncio.run(stalled(cfg))
  assert report["dropped"] == 0 and report["errors"] == {} and report["answered"] > 150
  assert report["latency_ms"]["p95"] > 100, report["latency_ms"]  # ~1/4 of the arrivals waited 0-400 ms
  assert report["send_lag_ms"]["max"] > 300, report["send_lag_ms"]


def test_summary_latency_is_of_200s_and_says_so():
  # Under overload most answers are quick 503s: percentiles over all answers would read far below what
  # an answered request waited. The summary leads with the 200s' and labels the mixed set.
  with stub_server(rank_status=lambda i: 200 if i % 4 == 0 else 503,
                   rank_delay_s=lambda i: 0.05 if i % 4 == 0 else 0.0) as url:
    cfg = loadgen.LoadConfig(url=url, model="stub", concurrency=2, duration=1.0, warmup=0, candidates=1, bodies=2)
    report = asyncio.run(loadgen.run_load(cfg))
  line = loadgen.summary(report)
  assert report["status"]["503"] > report["status"]["200"] > 0 and report["ok_latency_ms"]["p50"] >= 45
  first_p50 = float(line.split(" p50 ")[1].split()[0])
  assert first_p50 >= 45 and "HTTP 200 latency" in line.split(" p50 ")[0], line
  # and the rate it leads with is that of the 200s, not of every answer (mostly quick 503s)
  assert line.split(" cands: ")[1].startswith(f"{report['ok_rps']:.1f} ok req/s ({report['rps']:.1f} answered)"), line
  assert f"all {report['answered']} answers" in line, line


def test_percentiles_interpolate_linearly():
  """The report's percentiles are numpy's default (linear between the order statistics), rounded to us."""
  assert loadgen._percentiles([float(x) for x in range(1, 101)]) == {"p50": 50.5, "p95": 95.05, "p99": 99.01,
                                                                      "max": 100.0}
  assert loadgen._percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0, "max": 7.0}
  assert loadgen._percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_closed_loop_counts_only_the_measured_window():
  # One worker, 50 ms per answer: the 0.6 s warm-up's requests are neither counted nor in the rate's
  # window, so about 12 answers over about 0.6 s (not 24, nor 12 over 1.2 s).
  with stub_server(rank_delay_s=lambda i: 0.05) as url:
    cfg = loadgen.LoadConfig(url=url, model="stub", concurrency=1, duration=0.6, warmup=0.6, candidates=1, bodies=2)
    report = asyncio.run(loadgen.run_load(cfg))
  assert 0.6 <= report["wall_s"] < 1.1, report
  assert 3 <= report["answered"] <= 13 and report["sent"] == report["answered"], report
  assert report["rps"] == pytest.approx(report["answered"] / report["wall_s"], rel=0.02), report


def test_open_loop_counts_only_the_measured_arrivals():
  # 300 arrivals/s for 0.5 s after a 0.5 s warm-up, one in flight at a time: about 150 arrivals are counted
  # (sent or dropped), not the warm-up's too.
  with stub_server(rank_delay_s=lambda i: 0.02) as url:
    cfg = loadgen.LoadConfig(url=url, model="stub", mode="open", rate=300, concurrency=1, duration=0.5, warmup=0.5,
                             candidates=1, bodies=2)
    report = asyncio.run(loadgen.run_load(cfg))
  assert report["dropped"] > 0 and 100 < report["sent"] + report["dropped"] < 200, report
  assert report["sent"] == report["answered"] + sum(report["errors"].values()), report


def test_transport_errors_are_counted_apart_from_answers():
  # Every request times out (the stub answers after 1 s, the client waits 0.2 s): no answers, no latencies,
  # each failure counted under its exception's name.
  with stub_server(rank_delay_s=lambda i: 1.0) as url:
    cfg = loadgen.LoadConfig(url=url, model="stub", concurrency=2, duration=0.5, warmup=0, candidates=1, bodies=2,
                             timeout_s=0.2)
    report = asyncio.run(loadgen.run_load(cfg))
  assert report["answered"] == 0 and report["status"] == {} and report["latency_ms"]["max"] is None, report
  assert sum(report["errors"].values()) == report["sent"] >= 2, report
  assert "errors {'" in loadgen.summary(report)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_load_reports_what_it_measured(signum, status, tmp_path, capsys):
  """Ctrl-C or SIGTERM used to end the run with a traceback and no numbers; now the report covers the
  time until then (printed and written to --out), marked interrupted, and the exit status says which."""
  out = tmp_path / "load.json"
  # as in a terminal: a shell starts background jobs (CI's, say) with SIGINT ignored, and Python then
  # leaves it so, asyncio.run included
  sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
  with stub_server(rank_delay_s=lambda i: 0.01) as url:
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signum))
    timer.start()
    try:
      rc = loadgen.main(["--url", url, "--model", "stub", "--concurrency", "2", "--duration", "30", "--warmup", "0",
                         "--candidates", "1", "--bodies", "2", "--out", str(out)])
    finally:
      timer.cancel()
      signal.signal(signal.SIGINT, sigint)
  report = json.loads(out.read_text())
  assert rc == status and report["interrupted"] == signum.name, report
  assert report["answered"] > 10 and 1.0 < report["wall_s"] < 5 and report["errors"] == {}, report
  assert capsys.readouterr().out.startswith(f"interrupted ({signum.name}) after ")


def test_a_load_that_nothing_answers_fails(capsys):
  """Every request failing in transport (here: timing out; a server gone away is refused) used to pass as a
  run with exit status 0."""
  with stub_server(rank_delay_s=lambda i: 1.0) as url:
    rc = loadgen.main(["--url", url, "--model", "stub", "--concurrency", "2", "--duration", "0.5", "--warmup", "0",
                       "--candidates", "1", "--bodies", "2", "--timeout_s", "0.2"])
  out, err = capsys.readouterr()
  assert rc == 1 and "errors {'" in out and "none of the" in err and "requests was answered" in err, (out, err)
