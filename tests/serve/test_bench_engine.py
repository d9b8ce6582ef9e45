"""python -m serve.bench_engine: runs on a tiny ranker and reports numbers; bad input is a clear error."""

import pytest

from serve import bench_engine
from serve.engine import EngineConfig
from tests.serve.test_engine import SMOKE
from train import ranker



def test_engine_bench_reports_throughput(tmp_path, capsys):
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd)] + SMOKE) == 0
  r = bench_engine.run(wd, threads=2, candidates=5, seconds=0.5,
                       cfg=EngineConfig(buckets=(8, 32), max_rows=32, max_candidates=16))
  assert r["requests"] > 0 and r["requests_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
  assert bench_engine.main(["--workdir", str(tmp_path / "nope")]) == 2
  assert "error" in capsys.readouterr().err


def test_engine_bench_fails_when_callers_fail(tmp_path):
  # A caller whose Engine.rank raised (here Overloaded: queue of 1 for 4 threads) used to die with a
  # traceback on stderr while the run still reported the surviving threads' rate as the whole run's.
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd)] + SMOKE) == 0
  with pytest.raises(ValueError, match=r"of 4 caller threads failed \(Overloaded"):
    bench_engine.run(wd, threads=4, candidates=5, seconds=1.0,
                     cfg=EngineConfig(buckets=(8, 32), max_rows=32, max_candidates=16, max_queue=1))
