"""Prometheus text exposition (format 0.0.4) of the HTTP front end and of each engine's stats().

Written by hand: no global registry, every family is built from explicit state at scrape time.

    http = HttpMetrics()
    http.observe("/v1/rank", "demo", 200, 0.012)     # path template, model ("" unknown), code, seconds
    text = render(http, {"demo": engine.stats()})

>>> http = HttpMetrics(latency_buckets_s=(0.01, 0.1))
>>> http.observe("/v1/rank", "demo", 200, 0.05)
>>> out = Exposition()
>>> http.write(out)
>>> print(out.text(), end="")  # doctest: +NORMALIZE_WHITESPACE
# HELP jaxrec_http_requests_total HTTP requests answered, by path template, model and status code.
# TYPE jaxrec_http_requests_total counter
jaxrec_http_requests_total{path="/v1/rank",model="demo",code="200"} 1
# HELP jaxrec_http_request_duration_seconds Time from the request's first byte to its response's, seconds.
# TYPE jaxrec_http_request_duration_seconds histogram
jaxrec_http_request_duration_seconds_bucket{path="/v1/rank",model="demo",le="0.01"} 0
jaxrec_http_request_duration_seconds_bucket{path="/v1/rank",model="demo",le="0.1"} 1
jaxrec_http_request_duration_seconds_bucket{path="/v1/rank",model="demo",le="+Inf"} 1
jaxrec_http_request_duration_seconds_sum{path="/v1/rank",model="demo"} 0.05
jaxrec_http_request_duration_seconds_count{path="/v1/rank",model="demo"} 1
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Mapping

__all__ = ["CONTENT_TYPE", "Exposition", "Histogram", "HttpMetrics", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
AGE_BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
  return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
  return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels) + "}" if labels else ""


def _number(x: float) -> str:
  if isinstance(x, bool):
    x = int(x)
  if isinstance(x, int):
    return str(x)
  if math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "+Inf" if x > 0 else "-Inf"
  return repr(float(x))


class Exposition:
  """Metric families in the order first declared; `text()` is the exposition."""

  def __init__(self):
    self._families: dict[str, tuple[str, str, list[str]]] = {}

  def _family(self, name: str, kind: str, help_: str) -> list[str]:
    if name not in self._families:
      self._families[name] = (kind, help_, [])
    elif self._families[name][0] != kind:
      raise ValueError(f"metric {name} declared as {self._families[name][0]} and {kind}")
    return self._families[name][2]

  def add(self, name: str, kind: str, help_: str, value: float, labels: Labels = ()) -> None:
    """One sample of a counter or gauge (a counter's name ends in _total)."""
    if kind not in ("counter", "gauge"):
      raise ValueError(f"kind must be counter or gauge, got {kind}")
    self._family(name, kind, help_).append(f"{name}{_labels(labels)} {_number(value)}")

  def add_histogram(self, name: str, help_: str, bounds: Iterable[float], counts: Iterable[int], total: float,
                    labels: Labels = ()) -> None:
    """A histogram from per-bucket (not cumulative) `counts`, one per bound plus the +Inf overflow."""
    lines = self._family(name, "histogram", help_)
    bounds, counts = list(bounds), list(counts)
    if len(counts) != len(bounds) + 1:
      raise ValueError(f"{name}: {len(counts)} counts for {len(bounds)} bounds (+Inf)")
    cum = 0
    for le, c in zip([_number(float(b)) for b in bounds] + ["+Inf"], counts):
      cum += int(c)
      lines.append(f"{name}_bucket{_labels(labels + (('le', le),))} {cum}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(total)}")
    lines.append(f"{name}_count{_labels(labels)} {cum}")

  def text(self) -> str:
    out = []
    for name, (kind, help_, lines) in self._families.items():
      out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"] + lines
    return "\n".join(out) + "\n"


class Histogram:
  """Observations counted into fixed buckets (upper bounds, inclusive) and an overflow bucket."""

  def __init__(self, bounds: tuple[float, ...]):
    self.bounds = tuple(bounds)
    self.counts = [0] * (len(self.bounds) + 1)
    self.total = 0.0

  def observe(self, x: float) -> None:
    self.counts[bisect.bisect_left(self.bounds, x)] += 1
    self.total += x


class HttpMetrics:
  """Requests and latencies of the front end, by (path template, model, status code)."""

  def __init__(self, latency_buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S):
    self.latency_buckets_s = latency_buckets_s
    self._lock = threading.Lock()
    self._counts: dict[tuple[str, str, int], int] = {}
    self._latency: dict[tuple[str, str], Histogram] = {}
    self._age: dict[str, Histogram] = {}

  def observe(self, path: str, model: str, code: int, seconds: float) -> None:
    with self._lock:
      self._counts[path, model, code] = self._counts.get((path, model, code), 0) + 1
      hist = self._latency.get((path, model))
      if hist is None:
        hist = self._latency[path, model] = Histogram(self.latency_buckets_s)
      hist.observe(seconds)

  def observe_user_embedding(self, model: str, age_s: float) -> None:
    """The age of the user embedding a request was served (staleness; fallbacks have none)."""
    with self._lock:
      hist = self._age.get(model)
      if hist is None:
        hist = self._age[model] = Histogram(AGE_BUCKETS_S)
      hist.observe(age_s)

  def snapshot(self) -> dict:
    """The counters and histograms as plain data (how an HTTP worker process reports them)."""
    with self._lock:
      return {"counts": dict(self._counts),
              "latency": {k: (list(h.counts), h.total) for k, h in self._latency.items()},
              "age": {k: (list(h.counts), h.total) for k, h in self._age.items()}}

  @classmethod
  def merged(cls, snapshots: Iterable[dict], latency_buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> "HttpMetrics":
    """One HttpMetrics summing `snapshot()`s of several (one per HTTP worker process)."""
    out = cls(latency_buckets_s)
    for snap in snapshots:
      for key, n in snap["counts"].items():
        out._counts[key] = out._counts.get(key, 0) + n
      for src, dst, bounds in ((snap["latency"], out._latency, latency_buckets_s), (snap["age"], out._age, AGE_BUCKETS_S)):
        for key, (counts, total) in src.items():
          hist = dst.get(key)
          if hist is None:
            hist = dst[key] = Histogram(bounds)
          hist.counts = [a + b for a, b in zip(hist.counts, counts)]
          hist.total += total
    return out

  def write(self, out: Exposition) -> None:
    with self._lock:
      counts = sorted(self._counts.items())
      hists = sorted((k, list(h.counts), h.total) for k, h in self._latency.items())
      ages = sorted((k, list(h.counts), h.total) for k, h in self._age.items())
    for (path, model, code), n in counts:
      out.add("jaxrec_http_requests_total", "counter",
              "HTTP requests answered, by path template, model and status code.", n,
              (("path", path), ("model", model), ("code", str(code))))
    for (path, model), bucket_counts, total in hists:
      out.add_histogram("jaxrec_http_request_duration_seconds",
                        "Time from the request's first byte to its response's, seconds.",
                        self.latency_buckets_s, bucket_counts, total, (("path", path), ("model", model)))
    for model, bucket_counts, total in ages:
      out.add_histogram("jaxrec_user_embedding_age_seconds", "Age of the user embedding served with a request "
                        "(staleness; SUM rankers, fallbacks excluded), seconds.", AGE_BUCKETS_S, bucket_counts,
                        total, (("model", model),))


_ENGINE_COUNTERS = {
    "requests": "Requests the engine scored.",
    "rows": "Candidate rows the engine scored (padding excluded).",
    "failed_batches": "Batches whose step raised (their requests failed).",
    "failed_requests": "Requests failed by a failed batch.",
    "swaps": "Hot swaps done (every successful reload counts, also one that found the same checkpoint step).",
    "failed_swaps": "Hot swaps or reloads refused (SwapError: the served checkpoint was kept).",
}
_CACHE_TIERS = {  # ERCache counter (jaxrec.cache.ercache.COUNTERS) -> (family, tier)
    "direct_hits": ("hits", "direct"), "direct_misses": ("misses", "direct"),
    "direct_evictions": ("evictions", "direct"), "failover_hits": ("hits", "failover"),
    "failover_misses": ("misses", "failover"), "failover_evictions": ("evictions", "failover"),
}
_CACHE_OTHER = {
    "fresh": "User rows served a fresh user-model inference.",
    "inference_failures": "User rows whose user-model inference failed or missed its deadline.",
    "fallbacks": "User rows served the default user embedding (nothing cached young enough).",
    "writes": "User embeddings written to the cache.",
}
_CACHE_GAUGES = {"refresh_queued": "Refresh requests waiting for the SOAP worker (one per served batch that had "
                                    "users not served from the direct tier)."}
_SYNC_COUNTERS = {  # serve.user_embedding.UserEmbeddings.stats() in sync mode
    "sync_inferences": "Sync mode: batches whose user-model inference finished within the deadline.",
    "sync_timeouts": "Sync mode: batches whose user-model inference missed the deadline (failover tier served).",
    "sync_errors": "Sync mode: batches whose user-model inference raised (failover tier served).",
    "sync_unusable": "Sync mode: requests whose fresh embedding was non-finite or too large (not cached or served).",
}


def _metric_name(key: str) -> str:
  return "".join(c if c.isalnum() or c == "_" else "_" for c in key).lower()


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def write_engine_stats(out: Exposition, model: str, stats: Mapping) -> None:
  """The families of one engine's `Engine.stats()` (serve.engine), labelled model=`model`.

  Known keys get typed families (counters end in _total); the cache counters of a model with a
  user tower (stats["cache"], ERCache's COUNTERS) become jaxrec_cache_{hits,misses,evictions}_total
  by tier, next to served sources and SOAP refresh counters; any other numeric key is exported as
  the gauge jaxrec_engine_<key>.

  Rankers that consume the same user model share its cache and refresh worker, so their
  jaxrec_cache_* and served-source families repeat the same counts under each model label: sum
  them over one model per user model, not over all.
  """
  m = (("model", model),)
  for key, value in stats.items():
    if key in _ENGINE_COUNTERS and _is_number(value):
      out.add(f"jaxrec_engine_{key}_total", "counter", _ENGINE_COUNTERS[key], value, m)
    elif key == "batches" and isinstance(value, Mapping):
      for bucket, n in sorted(value.items(), key=lambda kv: int(kv[0])):
        out.add("jaxrec_engine_batches_total", "counter", "Batches run, by bucket (padded row count).", n,
                m + (("bucket", str(bucket)),))
    elif key == "batch_requests_hist" and isinstance(value, Mapping):
      bins = sorted((int(k), int(n)) for k, n in value.items())
      bounds = [b for b, _ in bins]
      total = float(stats["requests"])  # every batch's requests: the exact sum, not the bins' bounds
      out.add_histogram("jaxrec_engine_batch_requests", "Requests per batch (bucket bounds are powers of two, "
                        "all present from the start).", bounds, [n for _, n in bins] + [0], total, m)
    elif key == "queue_depth" and _is_number(value):
      out.add("jaxrec_engine_queue_depth", "gauge", "Requests waiting in the engine's queue.", value, m)
    elif key == "version" and _is_number(value):
      out.add("jaxrec_engine_model_version", "gauge", "Checkpoint step of the served ranker.", value, m)
    elif key == "user_model_version" and _is_number(value):
      out.add("jaxrec_user_model_version", "gauge", "Checkpoint step of the user model (SUM rankers).", value, m)
    elif key == "user_embedding" and isinstance(value, Mapping):
      _write_user_embedding(out, m, value)
    elif _is_number(value):
      name = _metric_name(key)
      out.add(f"jaxrec_engine_{name}", "gauge", f"Engine.stats()[{key!r}].", value, m)
    elif isinstance(value, Mapping):  # e.g. user_model: {version, ...}
      for k, v in value.items():
        if _is_number(v):
          out.add(f"jaxrec_engine_{_metric_name(key)}_{_metric_name(k)}", "gauge",
                  f"Engine.stats()[{key!r}][{k!r}].", v, m)


def _write_user_embedding(out: Exposition, m: Labels, stats: Mapping) -> None:
  """serve.user_embedding.UserEmbeddings.stats(): served sources, cache and refresh counters."""
  for source, n in stats.get("sources", {}).items():
    out.add("jaxrec_user_embedding_served_total", "counter",
            "Requests by the source of their user embedding (direct, fresh, failover, fallback).", n,
            m + (("source", source),))
  cache = stats.get("cache", {})
  if "direct_hits" in cache:
    out.add("jaxrec_cache_inferences_saved_total", "counter",
            "User-model inferences saved: rows served from the direct tier.", cache["direct_hits"], m)
  for key, value in cache.items():
    if not _is_number(value):
      continue
    if key in _CACHE_TIERS:
      family, tier = _CACHE_TIERS[key]
      out.add(f"jaxrec_cache_{family}_total", "counter", f"User-embedding cache {family}, by tier.", value,
              m + (("tier", tier),))
    elif key in _CACHE_OTHER:
      out.add(f"jaxrec_cache_{key}_total", "counter", _CACHE_OTHER[key], value, m)
    elif key in _CACHE_GAUGES:
      out.add(f"jaxrec_cache_{key}", "gauge", _CACHE_GAUGES[key], value, m)
    else:  # the SOAP worker's counters (jaxrec.cache.soap.WORKER_COUNTERS)
      out.add(f"jaxrec_cache_{_metric_name(key)}_total", "counter", f"SOAP refresh worker: {key}.", value, m)
  for key, help_text in _SYNC_COUNTERS.items():
    if _is_number(stats.get(key)):
      out.add(f"jaxrec_cache_{key}_total", "counter", help_text, stats[key], m)
  if _is_number(stats.get("users_kept")):
    out.add("jaxrec_user_embedding_users_kept", "gauge", "Users whose tower features are kept for refresh.",
            stats["users_kept"], m)
  out.add("jaxrec_user_embedding_refresh_error", "gauge",
          "1 while the user model's last attempt (a SOAP refresh, or a sync-mode inference) failed.",
          int(stats.get("last_error") is not None), m)


def render(http: HttpMetrics, engine_stats: Mapping[str, Mapping]) -> str:
  """The whole /metrics page: HTTP families, then each engine's {model: Engine.stats()}."""
  out = Exposition()
  http.write(out)
  for model, stats in engine_stats.items():
    write_engine_stats(out, model, stats)
  return out.text()
