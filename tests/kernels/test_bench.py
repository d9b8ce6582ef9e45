"""python -m kernels_pallas.bench: the smoke sweep runs, checks outputs and writes CSV + PNG."""

import csv

from kernels_pallas import bench


def test_smoke_bench_runs_checks_and_writes(tmp_path, capsys):
  assert bench.main(["--smoke", "--iters", "1", "--out", str(tmp_path)]) == 0
  with (tmp_path / "bench.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert {r["variant"] for r in rows} == {"xla_bf16", "xla_fp8_nk", "jaxrec_fp8"}
  assert all(r["ok"] == "True" for r in rows)
  assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_full_sweep_covers_the_issue_shapes():
  shapes = bench.full_sweep()
  assert len(shapes) == 19 and (8192, 8192, 8192) in shapes and (65536, 1024, 4096) in shapes
