"""Throughput of the serving engine alone, without HTTP: threads calling Engine.rank in-process.

    python -m serve.bench_engine --workdir runs/demo --threads 32 --candidates 200 --seconds 15

Every thread sends the same kind of request (the model's example request, its candidates repeated
to `--candidates`) back to back; validation and encoding run on the callers' threads as they do
under HTTP, batching and scoring on the engine's. The heap is frozen after start-up, as
`python -m serve` does. Prints requests/s and latency percentiles; beside `python -m serve.loadgen`
against `python -m serve` on the same model it shows what the HTTP front end costs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jaxrec.interrupts import entrypoint
from serve.engine import EngineConfig, open_engine
from serve.request import RankRequest


def run(workdir: Path, threads: int, candidates: int, seconds: float, cfg: EngineConfig = EngineConfig()) -> dict:
  """{"requests_per_s", "p50_ms", "p99_ms", "requests"} of `threads` callers over `seconds`."""
  if threads < 1 or candidates < 1 or not seconds > 0:
    raise ValueError("threads, candidates and seconds must be positive")
  eng = open_engine(workdir, cfg).start()
  try:
    ex = eng.example_request()
    req = RankRequest(ex["features"], [dict(ex["candidates"][i % len(ex["candidates"])]) for i in range(candidates)],
                      user_id=ex.get("user_id"))
    eng.rank(req, timeout=60)  # first request outside the timing
    gc.freeze()
    lat: list[float] = []
    failed: list[Exception] = []
    stop = time.monotonic() + seconds

    def caller():
      while time.monotonic() < stop:
        t0 = time.perf_counter()
        try:
          eng.rank(req, timeout=60)
        except Exception as e:  # noqa: BLE001 - Overloaded, a failed batch, ...: the run is not a measurement
          failed.append(e)
          return
        lat.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    t0 = time.monotonic()
    for w in workers:
      w.start()
    for w in workers:
      w.join()
    wall = time.monotonic() - t0
  finally:
    eng.close()
    gc.unfreeze()
  if failed:
    raise ValueError(f"{len(failed)} of {threads} caller threads failed ({failed[0]!r}); the numbers would "
                     "cover the others only")
  if not lat:
    raise ValueError(f"no request finished within --seconds {seconds}; give it more time")
  ms = np.asarray(lat) * 1e3
  return {"requests": int(ms.size), "requests_per_s": ms.size / wall, "p50_ms": float(np.percentile(ms, 50)),
          "p99_ms": float(np.percentile(ms, 99))}


@entrypoint
def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m serve.bench_engine", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo", help="a ranker run (default runs/demo)")
  p.add_argument("--threads", type=int, default=32, help="client threads submitting requests (default 32)")
  p.add_argument("--candidates", type=int, default=200, help="candidates per request (default 200)")
  p.add_argument("--seconds", type=float, default=15.0, help="how long to measure (default 15)")
  a = p.parse_args(argv)
  try:
    r = run(Path(a.workdir), a.threads, a.candidates, a.seconds)
  except (FileNotFoundError, ValueError) as e:
    print(f"python -m serve.bench_engine: error: {e}", file=sys.stderr)
    return 2
  print(f"engine only, {a.threads} threads, {a.candidates} candidates: {r['requests_per_s']:.1f} requests/s, "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms ({r['requests']} requests)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
