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
