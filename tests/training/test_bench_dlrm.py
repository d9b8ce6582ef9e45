"""The DLRMv2-like throughput benchmark runs (tiny size on CPU); numbers come from the GPU."""

from train import bench_dlrm


def test_bench_runs_and_prints_throughput(capsys):
  assert bench_dlrm.main(["--small", "--batch", "64", "--rows", "50", "--steps", "1", "--repeats", "2",
                          "--dtype", "float32"]) == 0
  out, err = capsys.readouterr()
  assert "ex/s" in out and "TF/s" in out
  # stdout holds the two result lines only; progress (it used to be silent until the end) is on stderr
  assert len(out.splitlines()) == 2 and out.startswith("device=") and "bench_dlrm:" not in out
  assert "compiling the train step and warming up (3 steps)" in err
  assert "compiled and warmed up in" in err and "timing 2 loop(s) of 1 steps" in err
  assert "timed steps: 100% 2/2" in err


def test_flops_match_the_anchor_formula():
  # ../shared/bench/dlrm_anchor.py prints 0.096 GFLOP/example for this config
  assert abs(bench_dlrm.flops_per_example() / 1e9 - 0.096) < 0.001


def test_non_positive_sizes_are_usage_errors(capsys):
  import pytest
  for flag in ("--batch", "--rows", "--steps", "--repeats"):
    with pytest.raises(SystemExit) as e:  # 0 used to fall back to the full GPU size
      bench_dlrm.main(["--small", flag, "0"])
    assert e.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err


def test_batch_the_mesh_cannot_split_is_a_usage_error(capsys, monkeypatch):
  """--batch 12 over 8 devices was a MeshError traceback; now a one-line usage error before anything
  is built or compiled."""
  import jax
  import pytest
  if jax.device_count() != 8:
    pytest.skip("needs the 8 host devices of tests/conftest.py")

  def built(*args, **kwargs):
    raise AssertionError("the model was built before the batch size was checked")
  monkeypatch.setattr(bench_dlrm, "create_train_state", built)
  with pytest.raises(SystemExit) as e:
    bench_dlrm.main(["--small", "--batch", "12"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert "error: --batch=12 must be a multiple of the 8 devices in the mesh" in err and "Traceback" not in err
  assert "compiling" not in err
