"""HTTP worker processes in front of one engine process (`python -m serve --workers N`).

One Python process parses about 770 rank requests/s of 200 candidates (HTTP, JSON, validation,
encoding: ~1.3 ms of event-loop time each, docs/BENCHMARKS.md), while the batching engine behind
it does several times that. With `--workers N` the work splits:

    engine process (python -m serve)          N worker processes (spawned)
      Registry: engines, device state,          uvicorn + the same FastAPI app (serve.app)
      caches, compiled steps                    over a RemoteRegistry: requests are
      Bridge: a Unix socket, one thread  <--->  validated and encoded here (RequestEncoder)
      per worker connection                     and only their rows cross the socket

Every worker accepts on the one listening socket the engine process bound (the kernel spreads the
connections), so the port is as before. The engines, ERCache tiers and SOAP workers stay single:
a user's requests share one cache whichever worker parses them. `/metrics` sums every worker's
HTTP counters (each reports its own every second and when it serves /metrics, so the other
workers' HTTP counters can trail the engines' by up to a second) with the engines' stats;
`/admin/reload` runs in the engine process. Workers never touch the accelerator (they run with
JAX_PLATFORMS=cpu and only numpy), and live in their own process group: SIGINT/SIGTERM to the
engine process is forwarded once to each worker, which drains its in-flight requests, and then the
engines drain. A worker that dies is reported and not restarted; the server stops when none is left.
A worker also stops when the engine process goes away.

Differences from one process: a request that times out in a worker (`--http.request_timeout_s`)
is answered 503 but still scored by the engine; `--http.max_in_flight` holds per worker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from serve.metrics import HttpMetrics

METRICS_PUSH_S = 1.0
"""how often a worker reports its HTTP counters to the engine process"""


class GracefulServer(uvicorn.Server):
  """uvicorn.Server whose SIGINT/SIGTERM shut down gracefully and then return from run() (uvicorn
  re-raises the signal afterwards, which would kill the process before the engines drain)."""

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in original.items():
        signal.signal(sig, handler)


# ---- engine process side


def _outcome(future: concurrent.futures.Future) -> tuple[object, BaseException | None]:
  if future.cancelled():
    return None, concurrent.futures.CancelledError()
  exc = future.exception()
  return (None, exc) if exc is not None else (future.result(), None)


class Bridge:
  """Serves the workers' calls in the engine process: rank requests go to the engines' queues,
  answers come back as their batches finish. Messages are tuples over multiprocessing connections:

      worker -> engine   ("rank", rid, model, EncodedRequest) | ("call", rid, method, args)
                         | ("metrics", worker, (seq, snapshot))
      engine -> worker   ("done", rid, result, exception)
  """

  def __init__(self, registry, num_workers: int):
    self.registry = registry
    self.num_workers = num_workers
    self._dir = tempfile.mkdtemp(prefix="jaxrec-serve-")
    self.address = str(Path(self._dir) / "engine.sock")
    self.authkey = secrets.token_bytes(32)
    self._listener = multiprocessing.connection.Listener(self.address, family="AF_UNIX", authkey=self.authkey)
    self._lock = threading.Lock()
    self._snapshots: dict[int, tuple[int, dict]] = {}  # worker -> its newest (seq, HTTP snapshot)
    self.hellos = 0
    self._hello = threading.Condition(self._lock)
    self._conns: list = []
    self._closing = False
    threading.Thread(target=self._accept, name="bridge-accept", daemon=True).start()

  def wait_for_workers(self, timeout: float, alive) -> bool:
    """True once every worker has connected; False after `timeout` s or when `alive()` turns False."""
    deadline = time.monotonic() + timeout
    with self._hello:
      while self.hellos < self.num_workers:
        left = deadline - time.monotonic()
        if left <= 0 or not alive():
          return False
        self._hello.wait(min(left, 0.2))
    return True

  def close(self) -> None:
    self._closing = True
    with contextlib.suppress(OSError):
      self._listener.close()
    for conn in list(self._conns):
      with contextlib.suppress(OSError, ValueError):  # shutdown wakes the thread blocked reading it
        with socket.socket(fileno=os.dup(conn.fileno())) as s:
          s.shutdown(socket.SHUT_RDWR)
      with contextlib.suppress(OSError):
        conn.close()
    with contextlib.suppress(OSError):
      os.unlink(self.address)
    with contextlib.suppress(OSError):
      os.rmdir(self._dir)

  def _accept(self) -> None:
    while True:
      try:
        conn = self._listener.accept()
      except (OSError, EOFError, multiprocessing.AuthenticationError):
        if self._closing:
          return
        continue
      self._conns.append(conn)
      threading.Thread(target=self._serve, args=(conn,), name="bridge-conn", daemon=True).start()

  def _serve(self, conn) -> None:
    out: queue.SimpleQueue = queue.SimpleQueue()

    def send_loop():
      while (msg := out.get()) is not None:
        try:
          conn.send(msg)
        except (OSError, ValueError):  # the worker went away
          return

    sender = threading.Thread(target=send_loop, name="bridge-send", daemon=True)
    sender.start()
    try:
      while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "rank":
          _, rid, model, enc = msg
          try:
            future = self.registry.get(model).submit_encoded(enc)
          except Exception as e:  # noqa: BLE001 - Overloaded, EngineClosed, UnknownModel: the worker maps them
            out.put(("done", rid, None, e))
            continue
          future.add_done_callback(lambda f, rid=rid: out.put(("done", rid, *_outcome(f))))
        elif kind == "call":  # rare (schemas, stats, reload): off this thread, a reload takes seconds
          threading.Thread(target=self._call, args=(out, *msg[1:]), name="bridge-call", daemon=True).start()
        elif kind == "metrics":
          self._keep_newest(msg[1], msg[2])
    except (EOFError, OSError):
      pass
    finally:
      out.put(None)

  def _call(self, out, rid: int, method: str, args: tuple) -> None:
    try:
      if method not in _CALLS:
        raise ValueError(f"unknown engine call {method!r}")
      result = getattr(self, "_do_" + method)(*args)
    except Exception as e:  # noqa: BLE001 - SwapError, UnknownModel, ...: raised in the worker
      out.put(("done", rid, None, e))
      return
    out.put(("done", rid, result, None))

  # the calls a worker can make (method names are fixed here, not taken from the message blindly)
  def _do_hello(self) -> dict:
    reg = self.registry
    with self._hello:
      self.hellos += 1
      self._hello.notify_all()
    return {"names": list(reg.names), "encoders": {n: reg.engines[n].encoder() for n in reg.names}}

  def _do_describe(self, name: str) -> dict:
    return self.registry.get(name).describe()

  def _do_example(self, name: str) -> dict:
    return self.registry.get(name).example_request()

  def _keep_newest(self, worker: int, numbered: tuple[int, dict]) -> None:
    """Stores a worker's (seq, snapshot) unless a newer one is stored: pushes are stored on the
    connection's thread and /metrics calls on their own, so they can arrive out of order, and an
    older snapshot would take the counters backwards."""
    with self._lock:
      if numbered[0] > self._snapshots.get(worker, (-1, None))[0]:
        self._snapshots[worker] = numbered

  def _do_metrics(self, worker: int, numbered: tuple[int, dict]) -> tuple[dict, dict]:
    """(every worker's HTTP counters summed, {model: engine stats})."""
    self._keep_newest(worker, numbered)
    with self._lock:
      snaps = [snap for _, snap in self._snapshots.values()]
    reg = self.registry
    return HttpMetrics.merged(snaps).snapshot(), {n: reg.engines[n].stats() for n in reg.names}

  def _do_reload(self, model: str | None) -> dict:
    out = self.registry.reload(model)
    if gc.get_freeze_count():  # the heap was frozen at start: let the replaced model be collected
      gc.unfreeze()
      gc.collect()
      gc.freeze()
    return out


_CALLS = {"hello", "describe", "example", "metrics", "reload"}


# ---- worker process side


class EngineLink:
  """A worker's connection to the engine process: `request` returns a future the reader thread
  resolves; if the engine process goes away every pending future fails with EngineClosed."""

  def __init__(self, address: str, authkey: bytes, on_lost=None):
    from serve.engine import EngineClosed
    self._closed_error = EngineClosed
    self._conn = multiprocessing.connection.Client(address, family="AF_UNIX", authkey=authkey)
    self._send_lock = threading.Lock()
    self._pending: dict[int, concurrent.futures.Future] = {}
    self._ids = itertools.count()
    self._lost = False
    self._on_lost = on_lost
    threading.Thread(target=self._read, name="engine-link", daemon=True).start()

  def request(self, kind: str, *payload) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    rid = next(self._ids)
    self._pending[rid] = future
    try:
      if self._lost:
        raise OSError("lost")
      with self._send_lock:
        self._conn.send((kind, rid, *payload))
    except (OSError, ValueError):
      self._pending.pop(rid, None)
      raise self._closed_error("the engine process is gone") from None
    return future

  def call(self, method: str, *args, timeout: float = 600.0):
    if method not in _CALLS:
      raise ValueError(f"unknown engine call {method!r}")
    return self.request("call", method, args).result(timeout)

  def push(self, *msg) -> None:
    """A one-way message (the metrics snapshots)."""
    with contextlib.suppress(OSError, ValueError), self._send_lock:
      self._conn.send(msg)

  def _read(self) -> None:
    try:
      while True:
        _, rid, result, exc = self._conn.recv()
        future = self._pending.pop(rid, None)
        if future is None or not future.set_running_or_notify_cancel():
          continue  # timed out and cancelled by the app meanwhile
        if exc is not None:
          future.set_exception(exc)
        else:
          future.set_result(result)
    except (EOFError, OSError):
      pass
    self._lost = True
    for rid in list(self._pending):
      future = self._pending.pop(rid, None)
      if future is not None and future.set_running_or_notify_cancel():
        future.set_exception(self._closed_error("the engine process is gone"))
    if self._on_lost is not None:
      self._on_lost()


class RemoteEngine:
  """The part of serve.engine.Engine the app uses, over an EngineLink: requests are validated and
  encoded in this process, then scored by the engine process."""

  def __init__(self, link: EngineLink, name: str, encoder):
    self._link, self.name, self._encoder = link, name, encoder

  def submit(self, req) -> concurrent.futures.Future:
    return self._link.request("rank", self.name, self._encoder.encode(req))

  def encoder(self):
    """The engine's serve.request.RequestEncoder (sent once, in the engine process's hello)."""
    return self._encoder

  def describe(self) -> dict:
    return self._link.call("describe", self.name)

  def example_request(self) -> dict:
    return self._link.call("example", self.name)


class RemoteRegistry:
  """serve.registry.Registry as the app sees it, in a worker process."""

  def __init__(self, link: EngineLink, hello: dict):
    self._link = link
    self.names = hello["names"]
    self.engines = {n: RemoteEngine(link, n, enc) for n, enc in hello["encoders"].items()}

  def get(self, name: str) -> RemoteEngine:
    from serve.registry import UnknownModel
    if name not in self.engines:
      raise UnknownModel(f"no model {name!r}; served: {', '.join(self.names)}")
    return self.engines[name]

  def reload(self, model: str | None = None) -> dict:
    return self._link.call("reload", model)


@dataclasses.dataclass(frozen=True)
class WorkerArgs:
  index: int
  address: str
  authkey: bytes
  http: object  # serve.app.HttpConfig
  admin_token: str | None
  log_level: str
  loop: str
  drain_timeout_s: float


def worker_main(args: WorkerArgs, sock: socket.socket) -> None:
  """A worker process: connect to the engine process, then serve HTTP on the inherited socket."""
  os.setpgrp()  # a terminal's Ctrl-C reaches only the engine process, which forwards one SIGTERM
  from serve.app import create_app  # imported here: the environment (JAX_PLATFORMS=cpu) is set
  from serve.engine import EngineClosed

  server: GracefulServer | None = None
  engine_gone = threading.Event()

  def lost():  # the engine process went away: stop taking requests, or never start
    engine_gone.set()
    if server is not None:
      server.should_exit = True

  def gone() -> None:
    print(f"serve worker {args.index}: the engine process went away while this worker started; exiting",
          file=sys.stderr, flush=True)
    sys.exit(1)

  try:
    link = EngineLink(args.address, args.authkey, on_lost=lost)
    hello = link.call("hello")
  except (OSError, EOFError, EngineClosed):
    gone()
  registry = RemoteRegistry(link, hello)
  metrics = HttpMetrics()

  seq, seq_lock = itertools.count(), threading.Lock()

  def numbered() -> tuple[int, dict]:  # taken in seq order: a higher seq never holds older counts
    with seq_lock:
      return next(seq), metrics.snapshot()

  def source():
    snap, stats = link.call("metrics", args.index, numbered(), timeout=30.0)
    return HttpMetrics.merged([snap]), stats

  app = create_app(registry, args.http, admin_token=args.admin_token, metrics=metrics, metrics_source=source)

  def push():
    while True:
      time.sleep(METRICS_PUSH_S)
      link.push("metrics", args.index, numbered())

  threading.Thread(target=push, name="metrics-push", daemon=True).start()
  gc.freeze()
  server = GracefulServer(uvicorn.Config(app, log_level=args.log_level, loop=args.loop, access_log=False,
                                         timeout_graceful_shutdown=math.ceil(args.drain_timeout_s)))
  if engine_gone.is_set():  # lost() ran before `server` was set (after, it set should_exit itself)
    gone()
  server.run(sockets=[sock])


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
  """The listening socket every worker accepts on. Made with proto=IPPROTO_TCP: asyncio sets
  TCP_NODELAY only on sockets whose proto says TCP, and without it a response written in two parts
  waits for the client's delayed ACK (a flat ~40 ms per request under load, measured)."""
  family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
  sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(backlog)
  except OSError:
    sock.close()
    raise
  return sock


def start_workers(bridge: Bridge, sock: socket.socket, n: int, **kw) -> list[multiprocessing.Process]:
  """Spawns n worker processes on the listening `sock` (their JAX stays on the CPU)."""
  ctx = multiprocessing.get_context("spawn")
  procs = []
  saved = os.environ.get("JAX_PLATFORMS")
  os.environ["JAX_PLATFORMS"] = "cpu"  # read by the children's jax at import; this process's is initialised
  try:
    for i in range(n):
      args = WorkerArgs(index=i, address=bridge.address, authkey=bridge.authkey, **kw)
      p = ctx.Process(target=worker_main, args=(args, sock), name=f"serve-worker-{i}", daemon=False)
      p.start()
      procs.append(p)
  finally:
    if saved is None:
      os.environ.pop("JAX_PLATFORMS", None)
    else:
      os.environ["JAX_PLATFORMS"] = saved
  return procs


def run_workers(bridge: Bridge, procs: list[multiprocessing.Process], drain_timeout_s: float,
                announce, sock: socket.socket) -> int:
  """Waits for the workers to connect (then calls `announce()`), then for SIGINT/SIGTERM or for every
  worker to exit; closes this process's copy of the listening socket `sock`, forwards one SIGTERM to
  each live worker and waits for them to drain. Returns the exit status: 0 after a signal, 1 when the
  workers did not start or all died on their own."""
  stop = threading.Event()
  original = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    if not bridge.wait_for_workers(120.0, alive=lambda: all(p.is_alive() for p in procs) and not stop.is_set()):
      if stop.is_set():  # told to stop while starting
        _stop(procs, drain_timeout_s, sock)
        return 0
      dead = [f"{p.name} exit code {p.exitcode}" for p in procs if not p.is_alive()]
      print("error: the HTTP workers did not start: " + (", ".join(dead) or "not all connected within 120 s"),
            file=sys.stderr, flush=True)
      _stop(procs, drain_timeout_s, sock)
      return 1
    announce()
    reported: set[str] = set()
    while not stop.wait(0.2):
      for p in procs:
        if not p.is_alive() and p.name not in reported:
          reported.add(p.name)
          print(f"warning: {p.name} exited (code {p.exitcode}); it is not restarted", file=sys.stderr, flush=True)
      if len(reported) == len(procs):
        print("error: every HTTP worker exited", file=sys.stderr, flush=True)
        return 1
    _stop(procs, drain_timeout_s, sock)
    return 0
  finally:
    for sig, handler in original.items():
      signal.signal(sig, handler)


def _stop(procs: list[multiprocessing.Process], drain_timeout_s: float, sock: socket.socket) -> None:
  # First this process's copy of the listening socket: while any copy is open the kernel completes new
  # connections into the backlog, which no stopping worker accepts, and resets them when the last copy closes.
  sock.close()
  for p in procs:
    if p.is_alive():
      with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGTERM)
  deadline = time.monotonic() + drain_timeout_s + 5.0
  for p in procs:
    p.join(max(0.0, deadline - time.monotonic()))
    if p.is_alive():
      p.kill()
      p.join(5.0)
