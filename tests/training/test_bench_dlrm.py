"""The DLRMv2-like throughput benchmark runs (tiny size on CPU); numbers come from the GPU."""

from train import bench_dlrm


def test_bench_runs_and_prints_throughput(capsys):
  assert bench_dlrm.main(["--small", "--batch", "64", "--rows", "50", "--steps", "1", "--repeats", "1",
                          "--dtype", "float32"]) == 0
  out = capsys.readouterr().out
  assert "ex/s" in out and "TF/s" in out


def test_flops_match_the_anchor_formula():
  # ../shared/bench/dlrm_anchor.py prints 0.096 GFLOP/example for this config
  assert abs(bench_dlrm.flops_per_example() / 1e9 - 0.096) < 0.001


def test_non_positive_sizes_are_usage_errors(capsys):
  import pytest
  for flag in ("--batch", "--rows", "--steps", "--repeats"):
    with pytest.raises(SystemExit) as e:  # 0 used to fall back to the full GPU size
      bench_dlrm.main(["--small", flag, "0"])
    assert e.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err
