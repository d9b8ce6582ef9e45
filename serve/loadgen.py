"""A bounded load generator for `python -m serve`, on loopback only.

    python -m serve.loadgen --model demo --mode closed --concurrency 32 --duration 20 --candidates 200
    python -m serve.loadgen --model demo --mode open --rate 500 --concurrency 64 --out /tmp/open.json

Request bodies are built from the server's GET /v1/models/{model}/example: `bodies` distinct
bodies of `candidates` candidates each, with the request's sparse ids (user_id, ...) and each
candidate's (ad_id, ...) drawn uniformly from the model's vocabularies (GET /v1/models). The client
is aiohttp (one session, at most `concurrency` connections), the same as ../shared/bench/serve_anchor.py.

closed: `concurrency` workers each send their next request as soon as the last one is answered.
open: requests arrive as a Poisson process of `rate` per second whatever the answers; an arrival
while `concurrency` requests are in flight is dropped (counted, never sent), so load stays bounded.
A request's latency runs from its scheduled arrival, not from when it was sent: when the generator
falls behind (a busy client), the wait counts (no coordinated omission), and send_lag_ms says how late
the sends went out.

The report (printed, and written as JSON to --out): requests/s answered and answered 200, latency
percentiles (ms) of all answers (latency_ms: 503s included, transport errors not) and of 200s
(ok_latency_ms, the one the printed line leads with), counts by status code, transport errors, drops,
and in open mode how late the sends went out (send_lag_ms).
Everything stops after `warmup` + `duration` s plus at most `timeout_s` for requests in flight. Ctrl-C or
SIGTERM stops it early: the report then covers the time until then, says `interrupted` (the signal's
name), and the exit status is 130 or 143. The exit status is 1 when requests went out and none was
answered (e.g. the server went away).

>>> check_loopback("http://127.0.0.1:8000"), check_loopback("http://localhost:8000")
(None, None)
>>> check_loopback("http://10.1.2.3:8000")
Traceback (most recent call last):
ValueError: --url host '10.1.2.3' is not a loopback address: ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Literal

import aiohttp
import numpy as np

from jaxrec.config import parse_config
from jaxrec.interrupts import entrypoint

PROG = "python -m serve.loadgen"


@dataclasses.dataclass(frozen=True)
class LoadConfig:
  url: str = "http://127.0.0.1:8000"
  """the server (loopback addresses only)"""
  model: str = "demo"
  mode: Literal["closed", "open"] = "closed"
  concurrency: int = 32
  """closed: workers sending back to back; open: most requests in flight (further arrivals drop)"""
  rate: float = 100.0
  """open: mean arrivals per second (Poisson)"""
  duration: float = 20.0
  """seconds of sending"""
  warmup: float = 1.0
  """seconds of the same load before `duration`, not counted"""
  candidates: int = 200
  """candidates per request"""
  bodies: int = 64
  """distinct request bodies, cycled"""
  timeout_s: float = 30.0
  """per request"""
  seed: int = 0
  out: str | None = None
  """write the report here as JSON"""

  def __post_init__(self):
    if self.concurrency < 1 or self.rate <= 0 or self.duration <= 0 or self.warmup < 0:
      raise ValueError("concurrency >= 1, rate > 0, duration > 0 and warmup >= 0 are needed")
    if self.candidates < 1 or self.bodies < 1 or self.timeout_s <= 0:
      raise ValueError("candidates >= 1, bodies >= 1 and timeout_s > 0 are needed")


def check_loopback(url: str) -> None:
  """ValueError unless `url` is http(s) to localhost or a loopback address."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ""
  if parts.scheme not in ("http", "https"):
    raise ValueError(f"--url must be http://HOST:PORT, got {url!r}")
  try:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:
    loopback = False
  if not loopback:
    raise ValueError(f"--url host {host!r} is not a loopback address: this load generator only targets "
                     "127.0.0.0/8, ::1 or localhost")


def make_bodies(example: dict, model_info: dict, cfg: LoadConfig) -> list[bytes]:
  """`cfg.bodies` JSON bodies like `example` with `cfg.candidates` candidates and random sparse ids."""
  rng = np.random.default_rng(cfg.seed)
  vocab = {f["name"]: (f["vocab_size"] or 2**31 - 1, f["max_len"]) for f in model_info["sparse"]}

  def vary(features: dict) -> dict:
    out = dict(features)
    for name, value in features.items():
      if name in vocab:
        hi, _ = vocab[name]
        n = len(value) if isinstance(value, list) else 1
        ids = [int(i) for i in rng.integers(0, hi, size=n)]
        out[name] = ids if isinstance(value, list) else ids[0]
    return out

  templates = example["candidates"]
  bodies = []
  for _ in range(cfg.bodies):
    body = {k: v for k, v in example.items() if k != "candidates"}
    body["features"] = vary(example.get("features", {}))
    if "user_id" in body:  # the cache key: the user feature's id when there is one, so users repeat
      uid = body["features"].get("user_id")
      body["user_id"] = uid if isinstance(uid, int) else int(rng.integers(0, 2**31 - 1))
    body["candidates"] = [{"item_id": i, "features": vary(templates[i % len(templates)]["features"])}
                          for i in range(cfg.candidates)]
    bodies.append(json.dumps(body).encode())
  return bodies


@dataclasses.dataclass
class _Tally:
  latencies_ms: list[float] = dataclasses.field(default_factory=list)
  ok_latencies_ms: list[float] = dataclasses.field(default_factory=list)
  status: dict[str, int] = dataclasses.field(default_factory=dict)
  errors: dict[str, int] = dataclasses.field(default_factory=dict)
  dropped: int = 0
  sent: int = 0
  send_lag_ms: list[float] = dataclasses.field(default_factory=list)


def _percentiles(xs: list[float]) -> dict[str, float | None]:
  if not xs:
    return {"p50": None, "p95": None, "p99": None, "max": None}
  a = np.asarray(xs)
  return {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 95, 99)} | {"max": round(float(a.max()), 3)}


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, tally: _Tally | None,
                t0: float | None = None) -> None:
  """One request; its latency runs from `t0` (perf_counter s: the scheduled send), default now."""
  t0 = time.perf_counter() if t0 is None else t0
  try:
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
      await r.read()
      code = r.status
  except (aiohttp.ClientError, TimeoutError) as e:
    if tally is not None:
      tally.errors[type(e).__name__] = tally.errors.get(type(e).__name__, 0) + 1
    await asyncio.sleep(0.01)  # a refused connection fails at once: do not spin
    return
  if tally is not None:
    ms = (time.perf_counter() - t0) * 1e3
    tally.latencies_ms.append(ms)
    tally.status[str(code)] = tally.status.get(str(code), 0) + 1
    if code == 200:
      tally.ok_latencies_ms.append(ms)


async def _closed(client, url, bodies, cfg: LoadConfig, t_count: float, t_end: float, tally: _Tally) -> None:
  async def worker(w: int) -> None:
    i = w
    while (now := time.perf_counter()) < t_end:
      counted = now >= t_count
      tally.sent += counted
      await _send(client, url, bodies[i % len(bodies)], tally if counted else None)
      i += cfg.concurrency

  await asyncio.gather(*(worker(w) for w in range(cfg.concurrency)))


async def _open(client, url, bodies, cfg: LoadConfig, t_count: float, t_end: float, tally: _Tally) -> None:
  rng = np.random.default_rng(cfg.seed + 1)
  in_flight: set[asyncio.Task] = set()
  nxt, i = time.perf_counter(), 0
  try:
    while nxt < t_end:
      await asyncio.sleep(max(0.0, nxt - time.perf_counter()))
      counted = nxt >= t_count
      if len(in_flight) >= cfg.concurrency:
        tally.dropped += counted
      else:
        tally.sent += counted
        if counted:
          tally.send_lag_ms.append((time.perf_counter() - nxt) * 1e3)
        task = asyncio.create_task(_send(client, url, bodies[i % len(bodies)], tally if counted else None, t0=nxt))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        i += 1
      nxt += float(rng.exponential(1.0 / cfg.rate))
    if in_flight:
      await asyncio.wait(in_flight)
  finally:  # interrupted: the requests in flight are dropped, not left to count as errors when the session closes
    for task in list(in_flight):
      task.cancel()


async def run_load(cfg: LoadConfig) -> dict:
  """Runs the load described by `cfg` and returns the report (see the module docstring)."""
  check_loopback(cfg.url)
  base = cfg.url.rstrip("/")
  connector = aiohttp.TCPConnector(limit=cfg.concurrency)
  timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
  async with aiohttp.ClientSession(base, connector=connector, timeout=timeout, raise_for_status=False) as client:
    async with client.get("/v1/models", raise_for_status=True) as r:
      models = (await r.json())["models"]
    info = next((m for m in models if m["name"] == cfg.model), None)
    if info is None:
      raise ValueError(f"model {cfg.model!r} is not served at {base}; served: {[m['name'] for m in models]}")
    if cfg.candidates > info["max_candidates"]:
      raise ValueError(f"--candidates {cfg.candidates} is over the server's max_candidates {info['max_candidates']}")
    async with client.get(f"/v1/models/{cfg.model}/example", raise_for_status=True) as r:
      example = await r.json()
    bodies = make_bodies(example, info, cfg)
    tally = _Tally()
    t0 = time.perf_counter()
    t_count, t_end = t0 + cfg.warmup, t0 + cfg.warmup + cfg.duration
    run = _closed if cfg.mode == "closed" else _open
    interrupted = await _interruptible(run(client, "/v1/rank", bodies, cfg, t_count, t_end, tally))
    wall = max(time.perf_counter() - t_count, 0.0)  # (interrupted during the warm-up: nothing was counted)
  answered = len(tally.latencies_ms)
  per_s = lambda n: round(n / wall, 2) if wall > 0 else 0.0  # noqa: E731
  return {
      "url": base, "model": cfg.model, "mode": cfg.mode, "concurrency": cfg.concurrency,
      "rate": cfg.rate if cfg.mode == "open" else None, "duration_s": cfg.duration, "candidates": cfg.candidates,
      "interrupted": interrupted,  # None, or the signal that cut the run short
      "wall_s": round(wall, 3), "sent": tally.sent, "answered": answered, "dropped": tally.dropped,
      "rps": per_s(answered), "ok_rps": per_s(len(tally.ok_latencies_ms)),
      "candidates_per_s": per_s(len(tally.ok_latencies_ms) * cfg.candidates),
      "latency_ms": _percentiles(tally.latencies_ms), "ok_latency_ms": _percentiles(tally.ok_latencies_ms),
      "status": dict(sorted(tally.status.items())), "errors": tally.errors,
      "send_lag_ms": _percentiles(tally.send_lag_ms) if cfg.mode == "open" else None,
      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


async def _interruptible(load) -> str | None:
  """Runs the coroutine `load`. When Ctrl-C (asyncio.run cancels the main task) or SIGTERM (made to do the
  same here, in the main thread) cuts it short, returns "SIGINT" or "SIGTERM" instead of raising, so the
  caller reports what was measured until then; else None."""
  if threading.current_thread() is not threading.main_thread():  # no signals here; cancelled is cancelled
    await load
    return None
  loop, task = asyncio.get_running_loop(), asyncio.current_task()
  terminated = []

  def terminate():
    terminated.append(True)
    task.cancel()

  before = signal.getsignal(signal.SIGTERM)
  loop.add_signal_handler(signal.SIGTERM, terminate)
  try:
    await load
    return None
  except asyncio.CancelledError:
    return "SIGTERM" if terminated else "SIGINT"
  finally:
    loop.remove_signal_handler(signal.SIGTERM)  # (which sets the default action)
    signal.signal(signal.SIGTERM, before)


def summary(report: dict) -> str:
  """One line: the rate of 200s (and of all answers), latency percentiles of the 200s (and of all
  answers when some were not 200), the open loop's send lag, status counts."""
  fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
  pct = lambda d: f"p50 {fmt(d['p50'])} p95 {fmt(d['p95'])} p99 {fmt(d['p99'])} max {fmt(d['max'])} ms"  # noqa: E731
  line = (f"{report['mode']} c={report['concurrency']}" + (f" rate={report['rate']:g}/s" if report["rate"] else "")
          + f" {report['candidates']} cands: {report['ok_rps']:.1f} ok req/s ({report['rps']:.1f} answered), "
          f"HTTP 200 latency {pct(report['ok_latency_ms'])}")
  if report["answered"] != report["status"].get("200", 0):  # 503s and other codes: their own timing
    line += f", all {report['answered']} answers {pct(report['latency_ms'])}"
  if report.get("send_lag_ms"):
    line += f", send lag p99 {fmt(report['send_lag_ms']['p99'])} max {fmt(report['send_lag_ms']['max'])} ms"
  line += f", status {report['status']}, errors {report['errors']}, dropped {report['dropped']}"
  return (f"interrupted ({report['interrupted']}) after {report['wall_s']:.1f} s of the {report['duration_s']:g} s "
          "asked: " + line
          if report.get("interrupted") else line)


@entrypoint
def main(argv: list[str] | None = None) -> int:
  cfg = parse_config(LoadConfig, argv, prog=PROG, description=__doc__.split("\n\n")[0])
  if cfg.out:  # checked before the load runs, not after it
    out = Path(cfg.out)
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
      print(f"{PROG}: error: cannot write --out {cfg.out}: not a file in a writable directory", file=sys.stderr)
      return 2
  try:
    report = asyncio.run(run_load(cfg))
  except (ValueError, aiohttp.ClientError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  print(summary(report))
  if cfg.out:
    try:
      with open(cfg.out, "w") as f:
        json.dump(report, f, indent=2)
    except OSError as e:  # the folder went away or filled up during the run: the summary above stays
      print(f"{PROG}: error: cannot write --out {cfg.out}: {e}", file=sys.stderr)
      return 2
  if report["interrupted"]:
    return 128 + signal.Signals[report["interrupted"]]
  if report["sent"] and not report["answered"]:
    print(f"{PROG}: error: none of the {report['sent']} requests was answered (the server went away?)",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
