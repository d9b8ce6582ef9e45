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
