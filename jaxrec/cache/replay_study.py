"""The ERCache replay study: inferences saved, downstream NE and staleness vs TTL, and failover.

`run_replay_study(cfg, workdir)` replays request streams through ERCache's device tiers
(`jaxrec.cache.replay`) under a sweep of direct TTLs and injected failure rates, and writes
WORKDIR/replay.json, replay.md and three PNGs (replay_ttl.png, replay_staleness.png,
replay_failover.png). Streams (`ReplayConfig.sources`):

- `adsworld`: the requests of the ads world's `stream` (default the eval split) over
  `warmup_s + measure_s` seconds, served by a SUM downstream ranker (`ranker`: a workdir of
  `python -m train.ranker --data.user_model DIR`, e.g. runs/sum_study/ranker_sum/seed0). The user
  tower's embedding of request r at its own time is what inference returns (`fresh[r]`); each
  policy's replay decides which embedding every request is served (a cached one computed at an
  earlier request, the fresh one, a failover ring's, or the fallback: zeros, the embedding
  mean), and the ranker scores every candidate of the measured requests with it. Downstream NE
  is reported per objective and relative to TTL 0 (inference on every request);
- `taobao` / `movielens`: the access pattern of a real log (Taobao UserBehavior events, MovieLens
  ratings; `../shared/data`): one request per event at its timestamp. No user model exists for
  them, so only inferences saved, staleness and fallbacks are reported.

Only requests at or after `warmup_s` count (from world time 0 on the ads world, from the first event
of a real log); the warm-up fills the cache as a long-running server's would be.

`ReplayConfig.requests` replays the ads world under another request process (`RequestProcess`:
the within-session gaps and session lengths) with the same users, ads, labels and session starts.
ERCache's access statistic (52% of a user's consecutive requests within 1 minute, 76% within 10)
fixes the gap distribution's two quantiles but not how requests cluster inside them, which decides
how many of the short gaps a TTL counted from the last *inference* covers; this sweeps that.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import jax
import numpy as np

from jaxrec.cache.ercache import Source
from jaxrec.cache.replay import AccessStream, ReplayPolicy, Trace, replay, summarize
from jaxrec.config import config_to_dict
from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
from jaxrec.data.batch import Batch
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.paths import require_data
from jaxrec.data.pipeline import pad_batch
from jaxrec.data.sources import check_stream_name
from jaxrec.metrics import MetricAccumulator
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.loop import make_workdir
from jaxrec.training.restore import read_run, restore_ranker
from jaxrec.training.step import batch_shardings, make_eval_step
from jaxrec.training.user_model import load_user_model

SOURCES = ("adsworld", "taobao", "movielens")


@dataclasses.dataclass(frozen=True)
class RequestProcess:
  """The ads world's request process for a replay; a field left at None keeps the value of the
  world the ranker was trained on (AdsWorldConfig documents each). Sessions start at the same
  times, on the same domains and devices; only when their requests arrive (and, for
  session_mean_requests, how many there are) changes."""

  gap_short_mean_s: float | None = None
  """mean of the short (scrolling) within-session gaps; none: the ranker's world's (12 s by default)"""
  gap_short_weight: float | None = None
  """share of within-session gaps that are short; none: the world's (0.62 by default)"""
  gap_medium_median_s: float | None = None
  """median of the medium (log-normal) within-session gaps; none: the world's (185 s by default)"""
  gap_medium_sigma: float | None = None
  """log-space sigma of the medium gaps; none: the world's (1.0 by default)"""
  session_mean_requests: float | None = None
  """mean requests per session; none: the world's (4.2 by default)"""

  def overrides(self) -> dict:
    """{AdsWorldConfig field: value} of the fields set."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def apply(self, world: AdsWorldConfig) -> AdsWorldConfig:
    """`world` with this request process (ValueError, from AdsWorldConfig's checks, on a bad value)."""
    return dataclasses.replace(world, **self.overrides())


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  ranker: str = "runs/sum_study/ranker_sum/seed0"
  """workdir of a SUM downstream ranker (trained with --data.user_model); its user model is the one
  its config names (python -m train.sum_study --workdir runs/sum_study makes both)"""
  sources: tuple[str, ...] = SOURCES
  """streams to replay: adsworld (with downstream NE), taobao, movielens (access pattern only; skipped
  with a note when ../shared/data is absent)"""
  stream: str = "eval"
  """the ads world's request stream (split) to replay"""
  warmup_s: int = 86_400
  """seconds of traffic that fill the cache before counting starts"""
  measure_s: int = 86_400
  """seconds of ads-world traffic counted after the warm-up (the real logs are replayed to their end)"""
  ttls_s: tuple[int, ...] = (0, 10, 30, 60, 90, 120, 300, 600, 1800, 3600, 86_400)
  """direct-tier TTLs swept (0: inference on every request, the NE reference; a day: about what a
  daily batch precompute of the embeddings would serve)"""
  soap_ttls_s: tuple[int, ...] = (0, 60)
  """direct TTLs replayed in SOAP mode too (requests never wait: served the newest cached embedding
  while the fresh one is written back for later requests)"""
  headline_ttl_s: int = 60
  """the direct TTL of the failure runs"""
  failure_rates: tuple[float, ...] = (0.01, 0.05)
  """injected user-model failure rates in (0, 1], each replayed with and without the failover tier (and
  headline_ttl_s joins the TTL sweep: their NE is compared with it, without failures)"""
  failover_ttl_s: int = 86_400
  max_requests: int = 0
  """replay only the first this many requests of each real log (0: all)"""
  stabilize_m: int = 1
  seed: int = 0
  eval_batch_size: int = 8192
  progress: bool = True
  requests: RequestProcess = RequestProcess()
  """the ads world's request process, where it should differ from the ranker's world (e.g.
  --requests.gap_short_mean_s 4: users scroll faster inside a session)"""

  def __post_init__(self):
    bad = [s for s in self.sources if s not in SOURCES]
    if bad or not self.sources:
      raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {self.sources}")
    if self.warmup_s < 0 or self.measure_s <= 0 or not self.ttls_s or min(self.ttls_s) < 0:
      raise ValueError("need warmup_s >= 0, measure_s > 0 and TTLs >= 0")
    if self.max_requests < 0:
      raise ValueError(f"max_requests must be >= 0, got {self.max_requests}")
    if 0 not in self.ttls_s:
      raise ValueError("ttls_s must include 0 (the no-cache reference the NE change is measured against)")
    if any(t < 0 for t in self.soap_ttls_s) or self.headline_ttl_s < 0 or self.failover_ttl_s < 0:
      raise ValueError("soap_ttls_s, headline_ttl_s and failover_ttl_s must be >= 0")
    served_stale = [self.headline_ttl_s] * bool(self.failure_rates) + list(self.soap_ttls_s)
    if served_stale and self.failover_ttl_s < max(served_stale):  # what the server refuses too (ERCacheConfig)
      raise ValueError(f"failover_ttl_s ({self.failover_ttl_s}) must be >= the direct TTLs whose failover tier is "
                       f"replayed: headline_ttl_s (with failure runs) and soap_ttls_s, up to {max(served_stale)}")
    check_stream_name(self.stream, "stream")
    if any(not 0.0 < r <= 1.0 for r in self.failure_rates):
      raise ValueError(f"failure_rates must be in (0, 1] (the TTL sweep is the run without failures), got "
                       f"{self.failure_rates}")
    if self.stabilize_m < 1 or self.eval_batch_size < 1:
      raise ValueError(f"stabilize_m and eval_batch_size must be >= 1, got {self.stabilize_m}, {self.eval_batch_size}")
    self.requests.apply(AdsWorldConfig())  # the request process's values are checked now, not after training

  def policies(self) -> list[tuple[str, ReplayPolicy]]:
    """(name, policy) of every replay: the TTL sweep (with headline_ttl_s when there are failure runs, their
    reference), then each failure rate without and with failover."""
    base = ReplayPolicy(failover_ttl_s=self.failover_ttl_s, stabilize_m=self.stabilize_m, seed=self.seed)
    ttls = set(self.ttls_s) | ({self.headline_ttl_s} if self.failure_rates else set())
    out = [(f"ttl={t}", dataclasses.replace(base, direct_ttl_s=t)) for t in sorted(ttls)]
    out += [(f"soap ttl={t}", dataclasses.replace(base, direct_ttl_s=t, soap=True))
            for t in sorted(set(self.soap_ttls_s))]
    for rate in self.failure_rates:
      for fo in (False, True):
        out.append((f"ttl={self.headline_ttl_s} fail={rate:g} failover={'on' if fo else 'off'}",
                    dataclasses.replace(base, direct_ttl_s=self.headline_ttl_s, failure_rate=rate, failover=fo)))
    return out


# ----- streams ------------------------------------------------------------------------------------


def taobao_stream() -> AccessStream:
  """One request per Taobao UserBehavior event (the head copy in ../shared/data), in time order."""
  from jaxrec.data.readers.taobao import read_taobao_events
  ev = read_taobao_events(require_data("taobao_userbehavior_head/UserBehavior.csv"))
  order = np.argsort(ev.timestamp, kind="stable")
  return AccessStream(ev.user_id[order].astype(np.int64), ev.timestamp[order].astype(np.int64), "taobao")


def movielens_stream() -> AccessStream:
  """One request per MovieLens-100k rating (u.data), in time order."""
  from jaxrec.data.readers.movielens import read_ratings
  r = read_ratings(require_data("ml-100k/u.data"))
  order = np.argsort(r[:, 3], kind="stable")
  return AccessStream(r[order, 0].astype(np.int64), r[order, 3].astype(np.int64), "movielens")


# ----- the ads world with a SUM ranker ----------------------------------------------------------


class SumRanker:
  """A SUM downstream ranker restored from its workdir, and the user tower its config names.

  `world` is the ads world the user model was trained on, with `requests` (if given) as its
  request process."""

  def __init__(self, workdir: str | Path, requests: RequestProcess = RequestProcess()):
    hint = "train one with: python -m train.sum_study --workdir runs/sum_study"
    try:
      self.cfg, self.schema = read_run(workdir)
    except FileNotFoundError:
      raise DataSpecError(f"ranker {str(workdir)!r}: not a training run's workdir (no config.json/schema.json); "
                          f"{hint}") from None
    if not self.cfg.data.user_model:
      raise DataSpecError(f"ranker {str(workdir)!r} was trained without --data.user_model: it reads no user "
                          f"embedding, so there is nothing to cache; {hint}")
    self.tower = load_user_model(self.cfg.data.user_model)
    self.world = AdsWorld(requests.apply(self.tower.world_config))
    mesh = sharding.make_mesh(self.cfg.train.num_devices)
    graphdef, self.state, state_sh = restore_ranker(self.cfg, self.schema, workdir, mesh,
                                                    row_multiple=mesh.devices.size)
    self._bsh = batch_shardings(mesh, True)
    self._step = make_eval_step(graphdef, state_sh, self._bsh)
    self.devices = mesh.devices.size

  def predict(self, batch: Batch) -> np.ndarray:
    """f32 [B, T] probabilities (batch rows a multiple of the mesh's devices)."""
    return np.asarray(self._step(self.state, jax.device_put(batch, self._bsh)))


def _adsworld_stream(ranker: SumRanker, cfg: ReplayConfig) -> tuple[AccessStream, np.ndarray, object]:
  req = ranker.world.requests(cfg.stream, 0.0, float(cfg.warmup_s + cfg.measure_s))
  if len(req) == 0:
    raise DataSpecError(f"the ads world's {cfg.stream!r} stream has no requests in the window")
  if not np.any(req.timestamp_s >= cfg.warmup_s):
    raise DataSpecError(f"the ads world's {cfg.stream!r} stream has no requests to count in [{cfg.warmup_s}, "
                        f"{cfg.warmup_s + cfg.measure_s}) s (the world's horizon is {ranker.world.cfg.horizon_s:g} "
                        "s): lower --warmup_s or raise --measure_s")
  stream = AccessStream(req.user_id.astype(np.int64), np.floor(req.timestamp_s).astype(np.int64), "adsworld")
  fresh = []
  chunk = 4096
  with progress(len(req), "user-model inference (fresh embeddings)", enabled=cfg.progress) as bar:
    for s in range(0, len(req), chunk):
      sl = slice(s, s + chunk)
      fresh.append(ranker.tower.embed_users(req.user_id[sl], req.timestamp_s[sl], ranker.world, cfg.stream))
      bar.update(min(chunk, len(req) - s))
  return stream, np.concatenate(fresh).astype(np.float32), req


def _measured_examples(ranker: SumRanker, cfg: ReplayConfig, req, measured: np.ndarray):
  """(base batch of the measured requests' candidates, the request index [N] of each row)."""
  ids = req.request_id[measured]
  k = ranker.world.cfg.candidates_per_request
  batch, extras = ranker.world.examples(cfg.stream, int(ids[0]) * k, (int(ids[-1]) + 1) * k)
  if not np.array_equal(np.unique(extras["request_id"]), ids):
    raise AssertionError("measured requests are not contiguous in the stream")  # time order = id order
  return batch, (extras["request_id"] - int(req.request_id[0])).astype(np.int64)


def _downstream_metrics(ranker: SumRanker, base: Batch, row_req: np.ndarray, served: np.ndarray,
                        cfg: ReplayConfig) -> dict:
  """Eval metrics of the ranker on the measured rows, each row given its request's served embedding."""
  acc = MetricAccumulator(ranker.schema.labels)
  n, bs = base.dense.shape[0], cfg.eval_batch_size
  bs += -bs % ranker.devices
  for s in range(0, n, bs):
    sl = slice(s, min(s + bs, n))
    part = dataclasses.replace(
        jax.tree.map(lambda a: a[sl], base),
        dense=np.concatenate([base.dense[sl], served[row_req[sl]]], axis=1).astype(np.float32))
    padded = pad_batch(part, bs)
    probs = ranker.predict(padded)[: sl.stop - sl.start]
    acc.add(part.labels, probs, part.weights, part.true_prob)
  return acc.result()


# ----- the study --------------------------------------------------------------------------------


def _replay_all(stream: AccessStream, fresh: np.ndarray, cfg: ReplayConfig, measured: np.ndarray,
                on_trace=None) -> dict:
  out = {}
  pols = cfg.policies()
  with progress(len(pols), f"replaying {stream.name} ({len(stream)} requests)", enabled=cfg.progress) as bar:
    for name, pol in pols:
      trace = replay(stream, fresh, pol)
      out[name] = {"policy": dataclasses.asdict(pol), **summarize(trace, measured)}
      out[name]["ages"] = _age_histogram(trace, measured, [p.direct_ttl_s for _, p in pols])
      if on_trace is not None:
        out[name].update(on_trace(trace))
      bar.update(1)
  return out


AGE_EDGES_S = (0,) + tuple(np.unique(np.round(np.geomspace(1, 2 * 86400, 106)).astype(int)).tolist())
"""served-age histogram edges (s): 0, then about 20 per decade up to two days (and each swept TTL)"""


def age_edges(ttls=()) -> tuple[int, ...]:
  """AGE_EDGES_S with each TTL in `ttls` added: a TTL's cut-off is then a bin edge, so the share of
  requests served younger than it is exact, not smeared over the bin around it."""
  return tuple(sorted(set(AGE_EDGES_S) | {int(t) for t in ttls if t > 0}))


def _age_histogram(trace: Trace, measured: np.ndarray, ttls=()) -> dict:
  """Counts of served ages (s) of the measured requests served any embedding but the fallback, in
  bins [edges[i], edges[i+1]) of `age_edges(ttls)` (the last bin open-ended): at each edge the
  share served younger than it is exact."""
  src = trace.source[measured]
  age = trace.age[measured][src != Source.FALLBACK]
  edges = age_edges(ttls)
  counts = np.histogram(age, np.asarray(edges + (np.iinfo(np.int32).max,)))[0]
  return {"edges_s": list(edges), "counts": counts.tolist()}


OUTPUTS = ("replay_ttl.png", "replay_staleness.png", "replay_failover.png", "replay.md", "replay.json")
"""what `run_replay_study` writes, in this order: replay.json last, so that it is there only when the rest is"""


def run_replay_study(cfg: ReplayConfig, workdir: str | Path) -> dict:
  """Runs every source's replays; writes `OUTPUTS` into `workdir`, after removing an earlier study's (an
  interrupted or failed run, or one whose sources were all skipped and so draws no plots, must not leave
  them beside its own)."""
  from jaxrec.cache import replay_report
  wd = Path(workdir)
  make_workdir(wd)
  for name in OUTPUTS:
    (wd / name).unlink(missing_ok=True)
  t0 = time.time()
  results: dict = {"config": config_to_dict(cfg), "date": datetime.date.today().isoformat(), "sources": {},
                   "skipped": {}}
  for source in cfg.sources:
    if source == "adsworld":
      ranker = SumRanker(cfg.ranker, cfg.requests)
      stream, fresh, req = _adsworld_stream(ranker, cfg)
      measured = req.timestamp_s >= cfg.warmup_s
      base, row_req = _measured_examples(ranker, cfg, req, measured)

      def downstream(trace: Trace, ranker=ranker, base=base, row_req=row_req):
        return {"metrics": _downstream_metrics(ranker, base, row_req, trace.embedding, cfg)}

      runs = _replay_all(stream, fresh, cfg, measured, downstream)
      zeros = _downstream_metrics(ranker, base, row_req, np.zeros_like(fresh), cfg)
      results["sources"]["adsworld"] = {"requests": len(stream), "measured_requests": int(measured.sum()),
                                        "measured_rows": int(base.dense.shape[0]), "runs": runs,
                                        "no_user_model_metrics": zeros, "ranker": str(cfg.ranker),
                                        "user_model": str(ranker.cfg.data.user_model),
                                        "request_process": _request_process(ranker.world.cfg,
                                                                            cfg.requests.overrides()),
                                        "consecutive_within": _gap_shares(stream, measured)}
    else:
      try:
        stream = taobao_stream() if source == "taobao" else movielens_stream()
        if cfg.max_requests:
          stream = AccessStream(stream.user_id[:cfg.max_requests], stream.time_s[:cfg.max_requests], stream.name)
      except DataFormatError as e:  # the real data folder is absent (or a file is malformed)
        results["skipped"][source] = str(e)
        continue
      measured = stream.time_s >= stream.time_s[0] + cfg.warmup_s
      fresh = np.zeros((len(stream), 1), np.float32)
      results["sources"][source] = {"requests": len(stream), "measured_requests": int(measured.sum()),
                                    "runs": _replay_all(stream, fresh, cfg, measured),
                                    "consecutive_within": _gap_shares(stream, measured)}
  results["seconds"] = time.time() - t0
  replay_report.plots(results, cfg, wd)
  (wd / "replay.md").write_text(replay_report.markdown(results, cfg))
  (wd / "replay.json").write_text(json.dumps(results, indent=2, allow_nan=True))  # last: see OUTPUTS
  return results


def _request_process(world: AdsWorldConfig, changed: dict) -> dict:
  """The replayed world's request-process fields, and which of them the replay changed."""
  names = [f.name for f in dataclasses.fields(RequestProcess)]
  return {"values": {n: getattr(world, n) for n in names}, "changed": sorted(changed)}


def _gap_shares(stream: AccessStream, window: np.ndarray) -> dict:
  """Shares of a user's consecutive requests within 60 s and 600 s (ERCache's access statistic), over the
  gaps that end at a request in `window` (bool [R], the counted requests): the gaps the inferences saved
  are over. The stream's first gaps are not: a gap reaching back before the stream's start is unseen,
  so they are biased short."""
  u, t = np.asarray(stream.user_id), np.asarray(stream.time_s)
  o = np.lexsort((t, u))
  same = (u[o][1:] == u[o][:-1]) & np.asarray(window, bool)[o][1:]
  gaps = np.diff(t[o])[same]
  return {"60": float(np.mean(gaps < 60)) if gaps.size else float("nan"),
          "600": float(np.mean(gaps < 600)) if gaps.size else float("nan")}


__all__ = ["ReplayConfig", "RequestProcess", "SOURCES", "SumRanker", "movielens_stream", "run_replay_study",
           "taobao_stream"]
