"""python -m serve.bench_engine: runs on a tiny ranker and reports numbers; bad input is a clear error."""

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
