"""ERCache replay: the scan against a Python model of the tiers, and the study end to end."""

import dataclasses
import doctest
import json

import numpy as np
import pytest

from jaxrec.cache import replay as replay_mod, replay_report
from jaxrec.cache.ercache import Source
from jaxrec.cache.replay import AccessStream, ReplayPolicy, failures, replay, summarize
from jaxrec.cache.replay_study import ReplayConfig, RequestProcess, _age_histogram, _gap_shares, run_replay_study
from jaxrec.data.adsworld import AdsWorldConfig
from jaxrec.training.sum_study import run_sum_study
from serve import replay as replay_cli
from train import sum_study


def reference(stream: AccessStream, fresh: np.ndarray, pol: ReplayPolicy):
  """ERCache's semantics (m = 1, no capacity limit) with a dict: user -> (embedding, write time). Each row is
  (source, age, embedding, whether the request ran an inference that failed)."""
  cache: dict[int, tuple[np.ndarray, int]] = {}
  failed = failures(len(stream), pol.failure_rate, pol.seed)
  t0 = int(stream.time_s[0])
  out = []
  for r, (u, t) in enumerate(zip(stream.user_id.tolist(), stream.time_s.tolist())):
    now = t - t0
    hit = cache.get(u)
    if hit is not None and now - hit[1] < pol.direct_ttl_s:
      out.append((Source.DIRECT, now - hit[1], hit[0], False))
      continue
    if pol.soap:  # served the newest cached embedding; the inference is written back afterwards
      if pol.failover and hit is not None and now - hit[1] < max(pol.failover_ttl_s, pol.direct_ttl_s):
        out.append((Source.FAILOVER, now - hit[1], hit[0], bool(failed[r])))
      else:
        out.append((Source.FALLBACK, -1, np.zeros_like(fresh[r]), bool(failed[r])))
      if not failed[r]:
        cache[u] = (fresh[r], now)
    elif not failed[r]:
      cache[u] = (fresh[r], now)
      out.append((Source.FRESH, 0, fresh[r], False))
    elif pol.failover and hit is not None and now - hit[1] < max(pol.failover_ttl_s, pol.direct_ttl_s):
      out.append((Source.FAILOVER, now - hit[1], hit[0], True))
    else:
      out.append((Source.FALLBACK, -1, np.zeros_like(fresh[r]), True))
  return out


def random_stream(rng, n, users, max_gap):
  t = np.cumsum(rng.integers(0, max_gap, n))
  return AccessStream(rng.integers(0, users, n).astype(np.int64), t.astype(np.int64))


@pytest.mark.parametrize("ttl,fail,failover,soap", [(0, 0.0, True, False), (20, 0.0, True, False),
                                                     (20, 0.3, True, False), (20, 0.3, False, False),
                                                     (5, 0.5, True, False), (0, 0.2, True, True),
                                                     (20, 0.3, True, True)])
def test_replay_matches_dict_model(ttl, fail, failover, soap):
  rng = np.random.default_rng(ttl * 7 + int(fail * 10))
  stream = random_stream(rng, 400, users=13, max_gap=9)
  fresh = rng.normal(size=(400, 3)).astype(np.float32)
  pol = ReplayPolicy(direct_ttl_s=ttl, failure_rate=fail, failover=failover, failover_ttl_s=60, capacity=64,
                     seed=3, soap=soap)
  trace = replay(stream, fresh, pol)
  want = reference(stream, fresh, pol)
  assert [Source(s) for s in trace.source] == [w[0] for w in want]
  np.testing.assert_array_equal(trace.age, [w[1] for w in want])
  np.testing.assert_array_equal(trace.embedding, np.stack([w[2] for w in want]))
  np.testing.assert_array_equal(trace.failed, [w[3] for w in want])
  s = summarize(trace)
  assert s["direct"] + s["fresh"] + s["failover"] + s["fallback"] == 400
  assert s["inferences"] == 400 - s["direct"] and s["failed_inferences"] == sum(w[3] for w in want)
  if ttl == 0:
    assert s["direct"] == 0
  if soap:
    assert s["fresh"] == 0  # SOAP never waits for (nor serves) the inference a request triggers
  if fail and not failover:
    assert s["failover"] == 0 and s["fallback"] == s["failed_inferences"]


def test_summary_of_an_empty_window_saves_nothing_known():
  """No request counted (a warm-up past a real log's end): inferences saved is unknown, not 0%."""
  stream = AccessStream(np.array([1, 1, 2]), np.array([0, 5, 9]))
  trace = replay(stream, np.zeros((3, 1), np.float32), ReplayPolicy(direct_ttl_s=60))
  s = summarize(trace, np.zeros(3, bool))
  assert s["requests"] == 0 and np.isnan(s["inferences_saved"]) and np.isnan(s["served_age"]["p50"])
  assert summarize(trace)["inferences_saved"] == 1 / 3


def test_gap_shares_are_over_the_measured_requests():
  """The access statistic beside the inferences saved is over the same requests: the warm-up's gaps (biased
  short: a gap reaching back before the stream's start is unseen) are left out."""
  stream = AccessStream(np.array([1, 1, 1, 1, 2, 2]), np.array([0, 10, 100, 130, 140, 900]))
  window = stream.time_s >= 100  # gaps ending in it: 90, 30 (user 1) and 760 (user 2)
  assert _gap_shares(stream, window) == {"60": 1 / 3, "600": 2 / 3}
  assert _gap_shares(stream, np.ones(6, bool)) == {"60": 0.5, "600": 0.75}


def test_summary_counts_and_ages_by_source():
  """Inferences saved = direct hits / counted requests; cached ages are of DIRECT and FAILOVER rows, served
  ages of every row but the fallback's (its age -1 is no age); the staleness histogram is the served ages."""
  D, F, O, B = Source.DIRECT, Source.FRESH, Source.FAILOVER, Source.FALLBACK
  trace = replay_mod.Trace(source=np.array([D, D, F, O, B, D], np.int32), age=np.array([30, 10, 0, 500, -1, 7]),
                           embedding=np.zeros((6, 1), np.float32), failed=np.array([0, 0, 0, 1, 1, 0], bool))
  window = np.array([1, 1, 1, 1, 1, 0], bool)  # the last request is warm-up
  s = summarize(trace, window)
  assert (s["requests"], s["direct"], s["fresh"], s["failover"], s["fallback"]) == (5, 2, 1, 1, 1)
  assert s["inferences"] == 3 and s["inferences_saved"] == 0.4 and s["failed_inferences"] == 2
  assert s["cached_age"] == pytest.approx({"mean": 180.0, "p50": 30.0, "p90": 406.0, "p99": 490.6, "max": 500.0})
  assert s["served_age"]["mean"] == 135.0 and s["served_age"]["p50"] == 20.0 and s["served_age"]["max"] == 500.0
  hist = _age_histogram(trace, window, ttls=(45, 600))
  edges, counts = hist["edges_s"], hist["counts"]
  assert sum(counts) == 4 and edges[0] == 0 and {45, 600} <= set(edges) and edges == sorted(set(edges))
  for age in (0, 10, 30, 500):  # each served age in the bin [edges[i], edges[i + 1]) that holds it
    i = np.searchsorted(edges, age, side="right") - 1
    assert counts[i] >= 1 and edges[i] <= age < (edges[i + 1] if i + 1 < len(edges) else np.inf)
  # a TTL is an edge: the share served younger than it is exact (coarse bins smeared it over [30, 60))
  younger = np.cumsum(counts)
  assert younger[edges.index(45) - 1] == 3 and younger[edges.index(600) - 1] == 4 and counts[0] == 1
  assert len(edges) > 90 and edges[-1] >= 2 * 86400  # every second up to 11 s, then ~20 edges a decade, to two days


def test_report_compares_each_run_with_its_reference():
  """replay.md: NE change vs TTL 0 is (NE / NE at TTL 0 - 1); a failure run's is against the same TTL
  without failures; the failover line says how many times fewer fallbacks there were."""
  def run(ttl, ne, fail=0.0, failover=True, fallback=0, saved=0.0):
    return {"policy": {"direct_ttl_s": ttl, "failure_rate": fail, "failover": failover, "soap": False},
            "inferences_saved": saved, "inferences": 10, "failover": 0, "fallback": fallback, "failed_inferences": 8,
            "served_age": {"p50": 1.0, "p90": 2.0, "p99": 3.0}, "metrics": {"click/ne": ne}}
  runs = {"ttl=0": run(0, 0.5), "ttl=60": run(60, 0.51, saved=0.25),
          "ttl=60 fail=0.2 failover=off": run(60, 0.53040, fail=0.2, failover=False, fallback=8),
          "ttl=60 fail=0.2 failover=on": run(60, 0.51, fail=0.2, fallback=2)}
  results = {"date": "d", "seconds": 1.0, "skipped": {}, "sources": {"adsworld": {
      "requests": 20, "measured_requests": 10, "runs": runs, "consecutive_within": {"60": 0.5, "600": 0.75}}}}
  md = replay_report.markdown(results, ReplayConfig(headline_ttl_s=60))
  assert "| 60 | 25.0% | 0.51000 | +2.000% |" in md, md
  assert "| 20% | off | 8 | 0 | 8 | +4.000% |" in md, md  # vs ttl=60 (0.51), not ttl=0 (+6.08%)
  assert "cuts fallbacks 8 -> 2 (4.0x fewer)" in md, md


def test_replay_negative_control():
  """A reference with the TTL off by one second disagrees: the comparison above can fail."""
  rng = np.random.default_rng(0)
  stream = random_stream(rng, 300, users=5, max_gap=6)
  fresh = rng.normal(size=(300, 2)).astype(np.float32)
  trace = replay(stream, fresh, ReplayPolicy(direct_ttl_s=10))
  want = reference(stream, fresh, ReplayPolicy(direct_ttl_s=11))
  assert [Source(s) for s in trace.source] != [w[0] for w in want]


def test_bad_streams_raise():
  with pytest.raises(ValueError, match="non-decreasing"):
    AccessStream(np.array([1, 2]), np.array([5, 3]))
  with pytest.raises(ValueError, match="fresh must be"):
    replay(AccessStream(np.array([1]), np.array([0])), np.zeros((2, 1)), ReplayPolicy())
  with pytest.raises(ValueError, match="failure_rate"):
    ReplayPolicy(failure_rate=1.5)
  with pytest.raises(ValueError, match="must include 0"):
    ReplayConfig(ttls_s=(60,))
  with pytest.raises(ValueError, match="failure_rates must be in"):
    ReplayConfig(failure_rates=(0.05, 2.0))
  with pytest.raises(ValueError, match="failure_rates must be in"):  # its runs would repeat the TTL sweep's rows
    ReplayConfig(failure_rates=(0.0, 0.05))
  with pytest.raises(ValueError, match="stabilize_m and eval_batch_size"):
    ReplayConfig(stabilize_m=0)
  with pytest.raises(ValueError, match="soap_ttls_s, headline_ttl_s and failover_ttl_s"):
    ReplayConfig(soap_ttls_s=(0, -60))


def test_failure_runs_have_their_reference_in_the_sweep():
  """The failure runs' NE is reported against the same TTL without failures, so that TTL is replayed even
  when --ttls_s leaves it out (else the report compared them with TTL 0, and called it 'no failures')."""
  names = [n for n, _ in ReplayConfig(ttls_s=(0, 600), headline_ttl_s=60).policies()]
  assert names[:3] == ["ttl=0", "ttl=60", "ttl=600"] and "ttl=60 fail=0.05 failover=on" in names
  assert "ttl=60" not in [n for n, _ in ReplayConfig(ttls_s=(0, 600), headline_ttl_s=60, failure_rates=()).policies()]


def test_doctest():
  assert doctest.testmod(replay_mod).failed == 0


@pytest.fixture(scope="module")
def sum_runs(tmp_path_factory):
  wd = tmp_path_factory.mktemp("sum")
  run_sum_study(sum_study.smoke(), wd)
  return wd


def small_config(sum_runs, sources=("adsworld",)):
  return ReplayConfig(ranker=str(sum_runs / "ranker_sum" / "seed0"), sources=sources, warmup_s=7200,
                      measure_s=7200, ttls_s=(0, 60, 600), soap_ttls_s=(0,), failure_rates=(0.2,),
                      max_requests=12_000,
                      progress=False)


def test_study_on_the_ads_world(sum_runs, tmp_path):
  assert AdsWorldConfig.small() == sum_study.smoke().world
  out = run_replay_study(small_config(sum_runs), tmp_path)
  res = out["sources"]["adsworld"]
  runs = res["runs"]
  assert res["measured_requests"] > 50 and res["measured_rows"] == res["measured_requests"] * 32
  assert runs["ttl=0"]["inferences_saved"] == 0 and runs["ttl=600"]["inferences_saved"] > 0
  ne0 = runs["ttl=0"]["metrics"]["click/ne"]
  assert np.isfinite(ne0) and runs["ttl=0"]["metrics"]["click/count"] == res["measured_rows"]
  off, on = runs["ttl=60 fail=0.2 failover=off"], runs["ttl=60 fail=0.2 failover=on"]
  assert off["failed_inferences"] == on["failed_inferences"] > 0  # same seeded failures
  assert off["fallback"] == off["failed_inferences"] and on["fallback"] < off["fallback"]
  assert res["no_user_model_metrics"]["click/ne"] != ne0
  soap = runs["soap ttl=0"]
  assert soap["fresh"] == 0 and soap["direct"] == 0 and soap["failover"] > 0  # served the previous request's
  assert np.isfinite(soap["metrics"]["click/ne"])
  saved = json.loads((tmp_path / "replay.json").read_text())
  assert saved["sources"]["adsworld"]["runs"]["ttl=60"]["inferences_saved"] == runs["ttl=60"]["inferences_saved"]
  md = (tmp_path / "replay.md").read_text()
  assert "| 60 |" in md and "failover tier cuts fallbacks" in md and "SOAP" in md
  for png in ("replay_ttl.png", "replay_staleness.png", "replay_failover.png"):
    assert (tmp_path / png).stat().st_size > 10_000, png


@pytest.mark.realdata
def test_study_on_real_access_logs(data_dir, sum_runs, tmp_path):
  out = run_replay_study(small_config(sum_runs, ("movielens", "taobao")), tmp_path)
  for source in ("movielens", "taobao"):
    res = out["sources"][source]
    assert res["requests"] == 12_000 and 0 < res["runs"]["ttl=60"]["inferences_saved"] < 1
    assert "metrics" not in res["runs"]["ttl=60"]


def test_cli_errors_clearly(tmp_path, capsys):
  assert replay_cli.main(["--workdir", str(tmp_path / "out"), "--ranker", str(tmp_path / "nope")]) == 2
  assert "not a training run's workdir" in capsys.readouterr().err


def test_no_requests_to_count_is_a_clear_error(sum_runs, tmp_path, capsys):
  """A warm-up past the world's horizon leaves no ads-world request to count: an error, not an IndexError."""
  argv = ["--workdir", str(tmp_path / "out"), "--ranker", str(sum_runs / "ranker_sum" / "seed0"), "--sources",
          "adsworld", "--warmup_s", "100000000", "--no-progress"]
  assert replay_cli.main(argv) == 2
  assert "no requests to count" in capsys.readouterr().err


def test_study_under_another_request_process(sum_runs, tmp_path):
  """--requests.* replays the same world with other within-session gaps: here every within-session
  gap is a 2 s scroll, so more consecutive requests fall within 60 s and more inferences are saved."""
  base = dataclasses.replace(small_config(sum_runs), ttls_s=(0, 60), soap_ttls_s=(), failure_rates=())
  fast = dataclasses.replace(base, requests=RequestProcess(gap_short_mean_s=2.0, gap_short_weight=1.0))
  runs = {name: run_replay_study(cfg, tmp_path / name)["sources"]["adsworld"]
          for name, cfg in (("base", base), ("fast", fast))}
  assert runs["base"]["request_process"]["changed"] == []
  assert runs["fast"]["request_process"]["changed"] == ["gap_short_mean_s", "gap_short_weight"]
  assert runs["fast"]["request_process"]["values"]["gap_short_mean_s"] == 2.0
  assert runs["fast"]["consecutive_within"]["60"] > runs["base"]["consecutive_within"]["60"] + 0.05
  saved = {k: r["runs"]["ttl=60"]["inferences_saved"] for k, r in runs.items()}
  assert saved["fast"] > saved["base"] + 0.05
  assert np.isfinite(runs["fast"]["runs"]["ttl=60"]["metrics"]["click/ne"])
  md = (tmp_path / "fast" / "replay.md").read_text()
  assert "gap_short_mean_s 2 (changed for this replay)" in md and "gap_medium_median_s 185," in md


@pytest.mark.parametrize("argv, match", [
    (["--requests.gap_short_weight", "1.5"], "gap_short_weight must be in"),
    (["--requests.gap_short_mean_s", "0"], "gap_short_mean_s must be > 0"),
    (["--requests.session_mean_requests", "0.5"], "session_mean_requests must be >= 1"),
    (["--requests.gap_medium_sigma", "-1"], "gap_medium_sigma must be >= 0"),
])
def test_bad_request_process_is_a_config_error(tmp_path, capsys, argv, match):
  with pytest.raises(SystemExit) as e:
    replay_cli.main(["--workdir", str(tmp_path / "out"), *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "invalid config" in err and match in err
  assert not (tmp_path / "out").exists()
