"""Serve the rankers training runs left in a folder over HTTP.

    python -m serve                                   # runs/demo (after `make demo`) on 127.0.0.1:8000
    python -m serve --workdir runs --port 8001        # every ranker run under runs/, named by path
    python -m serve --engine.buckets 64,256 --engine.max_rows 256 --engine.max_candidates 256 --admin_token s3cret
    python -m serve --workdir runs --engine_per_model ttl.json    # per-model overrides, see serve.registry
    python -m serve --workers 4                       # 4 HTTP worker processes before one engine process
    python -m serve --help                            # every config field, its type and default

--workdir is one ranker run (served under the directory's name) or a folder of runs (each served
under its relative path with "/" replaced by "."); see serve.registry. Every bucket of every model is
compiled before the port opens. SIGINT/SIGTERM stop taking connections, let in-flight requests
finish (up to drain_timeout_s) and drain the engines. Endpoints: see serve.app. With --workers N
the HTTP side runs in N processes in front of this one's engines (serve.workers).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
from pathlib import Path
from typing import Literal

import uvicorn

from jaxrec.config import parse_config
from jaxrec.interrupts import entrypoint
from serve.app import HttpConfig, create_app
from serve.engine import EngineConfig
from serve.registry import NoRunsError, Registry, discover_runs, engine_configs
from serve.workers import Bridge, GracefulServer, listen, run_workers, start_workers

PROG = "python -m serve"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  workdir: str = "runs/demo"
  """a ranker run's workdir, or a folder of them"""
  host: str = "127.0.0.1"
  """interface to bind (loopback by default; 0.0.0.0 exposes the server to the network)"""
  port: int = 8000
  """TCP port to listen on (0: any free port, printed when serving starts)"""
  admin_token: str | None = None
  """token for /admin/* (Authorization: Bearer TOKEN); none reads JAXREC_ADMIN_TOKEN, and without
  either the admin endpoints answer 403"""
  max_depth: int = 3
  """how many levels below workdir to look for runs (>= 1)"""
  drain_timeout_s: float = 30.0
  """on SIGINT/SIGTERM, how long in-flight requests may take to finish"""
  log_level: str = "warning"
  """uvicorn's log level (access logs are off)"""
  loop: Literal["asyncio", "uvloop", "auto"] = "asyncio"
  """uvicorn's event loop (uvloop needs the uvloop package; auto takes it when installed)"""
  engine: EngineConfig = EngineConfig()
  """every model's engine (buckets, batching, queue, and a SUM ranker's user cache: TTLs, capacities)"""
  engine_per_model: str = ""
  """a JSON file of per-model overrides of --engine.*: {model name: {field: value, "user_cache": {...}}}"""
  http: HttpConfig = HttpConfig()
  workers: int = 1
  """HTTP worker processes, 1 to 64: 1 serves HTTP in this process; N > 1 spawns N processes that parse,
  validate and encode requests in front of this process's engines (one Python process tops out near
  770 requests/s of 200 candidates; serve.workers)"""

  def __post_init__(self):
    if not 0 <= self.port <= 65535:
      raise ValueError(f"port must be in [0, 65535] (0 = any free port), got {self.port}")
    if self.log_level not in LOG_LEVELS:
      raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
    if not 1 <= self.workers <= 64:
      raise ValueError(f"workers must be in [1, 64], got {self.workers}")
    if self.max_depth < 1:
      raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
    if not 0 <= self.drain_timeout_s <= 86_400:
      raise ValueError(f"drain_timeout_s must be in [0, 86400] seconds, got {self.drain_timeout_s}")


def smoke() -> ServeConfig:
  """Small buckets and queue: starts in seconds on CPU."""
  return ServeConfig(engine=EngineConfig(buckets=(8, 64, 256), max_rows=256, max_candidates=256, max_queue=32))


@entrypoint
def main(argv: list[str] | None = None) -> int:
  cfg = parse_config(ServeConfig, argv, prog=PROG, description=__doc__.split("\n\n")[0])
  try:
    runs = discover_runs(Path(cfg.workdir), cfg.max_depth)
    engine_cfgs = engine_configs(list(runs), cfg.engine, cfg.engine_per_model)
  except (NoRunsError, ValueError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  token = cfg.admin_token or os.environ.get("JAXREC_ADMIN_TOKEN") or None
  print(f"loading {len(runs)} model(s) and compiling their buckets: "
        + ", ".join(f"{n} ({p}, buckets {list(engine_cfgs[n].buckets)})" for n, p in runs.items()),
        file=sys.stderr, flush=True)
  try:
    registry = Registry.open(runs, engine_cfgs)
  except (FileNotFoundError, ValueError) as e:
    print(f"{PROG}: error: cannot load a run: {e}", file=sys.stderr)
    return 2
  # Everything loaded so far (jax, the models, compiled steps: millions of objects) lives as long as
  # the server: keep it out of the collector's full passes, which otherwise stall the event loop
  # for ~0.2 s every few seconds under load (a p99 tail of 230 ms measured at concurrency 8).
  gc.freeze()
  try:  # bound before "serving ..." is announced, by one process or many (serve.workers.listen)
    sock = listen(cfg.host, cfg.port)
  except OSError as e:
    registry.close(drain=False)
    print(f"{PROG}: error: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
    return 2
  if cfg.workers > 1:
    return _serve_with_workers(cfg, registry, token, sock)
  app = create_app(registry, cfg.http, admin_token=token)
  server = GracefulServer(uvicorn.Config(app, log_level=cfg.log_level, loop=cfg.loop, access_log=False,
                                         timeout_graceful_shutdown=math.ceil(cfg.drain_timeout_s)))
  print(f"serving {registry.names} on {_url(cfg.host, sock.getsockname()[1])} (admin "
        f"{'enabled' if token else 'disabled'}); Ctrl-C drains and stops", file=sys.stderr, flush=True)
  try:
    server.run(sockets=[sock])
  finally:
    sock.close()
    registry.close(drain=True, timeout=cfg.drain_timeout_s)
    print("drained and stopped", file=sys.stderr, flush=True)
  return 0 if server.started else 1


def _url(host: str, port: int) -> str:
  """http://HOST:PORT, an IPv6 address in brackets (http://[::1]:8000)."""
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _serve_with_workers(cfg: ServeConfig, registry: Registry, token: str | None, sock) -> int:
  bridge = Bridge(registry, cfg.workers)
  rc = 1
  try:
    procs = start_workers(bridge, sock, cfg.workers, http=cfg.http, admin_token=token, log_level=cfg.log_level,
                          loop=cfg.loop, drain_timeout_s=cfg.drain_timeout_s)
    port = sock.getsockname()[1]
    rc = run_workers(bridge, procs, cfg.drain_timeout_s, announce=lambda: print(
        f"serving {registry.names} on {_url(cfg.host, port)} with {cfg.workers} HTTP worker processes (admin "
        f"{'enabled' if token else 'disabled'}); Ctrl-C drains and stops", file=sys.stderr, flush=True), sock=sock)
  finally:
    sock.close()
    registry.close(drain=True, timeout=cfg.drain_timeout_s)
    bridge.close()
    print("drained and stopped", file=sys.stderr, flush=True)
  return rc


if __name__ == "__main__":
  sys.exit(main())
