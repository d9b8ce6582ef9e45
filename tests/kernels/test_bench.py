"""python -m kernels_pallas.bench: the smoke sweep runs, checks outputs and writes CSV + PNG."""

import csv

import pytest

from kernels_pallas import bench


def test_smoke_bench_runs_checks_and_writes(tmp_path, capsys):
  assert bench.main(["--smoke", "--iters", "1", "--out", str(tmp_path)]) == 0
  with (tmp_path / "bench.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert {(r["op"], r["variant"]) for r in rows} == {
      ("gemm", "xla_bf16"), ("gemm", "xla_fp8_nk"), ("gemm", "jaxrec_fp8"),
      ("gemm", "xla_fp8_block_nk"), ("gemm", "jaxrec_fp8_block"),
      ("layer", "xla_bf16_layer"), ("layer", "xla_fp8_nk_layer"), ("layer", "jaxrec_fp8_layer")}
  assert len(rows) == 8 * len(bench.SMOKE)  # every variant on every smoke shape
  # speedups are against each op's own XLA bf16 variant
  baselines = [r for r in rows if r["variant"] in ("xla_bf16", "xla_bf16_layer")]
  assert baselines and all(float(r["speedup_vs_bf16"]) == 1.0 for r in baselines)
  assert all(r["ok"] == "True" for r in rows)
  assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_a_wrong_kernel_output_is_caught(tmp_path, capsys, monkeypatch):
  """Negative control: a variant whose output is twice the reference is marked not ok in the CSV,
  named WRONG on stdout, and the run exits 1 (one shape: --seconds stops the sweep after it)."""
  real = bench.variants

  def one_wrong(m, k, n, on_gpu):
    out = real(m, k, n, on_gpu)
    return [(op, name, (lambda *a, f=fn: 2 * f(*a)) if name == "jaxrec_fp8" else fn, args, ref)
            for op, name, fn, args, ref in out]

  monkeypatch.setattr(bench, "variants", one_wrong)
  assert bench.main(["--smoke", "--iters", "1", "--seconds", "1e-9", "--out", str(tmp_path)]) == 1
  captured = capsys.readouterr()
  assert "error: 1 outputs differ from the reference" in captured.err
  wrong = [line for line in captured.out.splitlines() if line.endswith("WRONG")]
  assert len(wrong) == 1 and " jaxrec_fp8 " in wrong[0]
  with (tmp_path / "bench.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert {r["variant"]: r["ok"] for r in rows if r["ok"] == "False"} == {"jaxrec_fp8": "False"}
  assert float(next(r for r in rows if r["variant"] == "jaxrec_fp8")["rel_err"]) == pytest.approx(1.0, abs=0.05)


def test_full_sweep_covers_the_issue_shapes():
  shapes = bench.full_sweep()
  assert len(shapes) == 19 and (8192, 8192, 8192) in shapes and (65536, 1024, 4096) in shapes


def test_bad_iters_is_a_usage_error(capsys):
  import pytest
  from kernels_pallas import bench_quantize
  for mod in (bench, bench_quantize):
    with pytest.raises(SystemExit) as e:
      mod.main(["--iters", "0"])
    assert e.value.code == 2 and "--iters must be >= 1" in capsys.readouterr().err


def test_seconds_budget_stops_the_sweep_and_still_writes(tmp_path, capsys):
  """bench/gpu_session.sh runs both benchmarks time-boxed: a budget reached ends the sweep early
  with its outputs written instead of a timeout killing it before them."""
  import pytest
  from kernels_pallas import bench_quantize
  assert bench.main(["--smoke", "--iters", "1", "--seconds", "1e-9", "--out", str(tmp_path)]) == 0
  assert f"stopped after 1 of {len(bench.SMOKE)} shapes" in capsys.readouterr().out
  with (tmp_path / "bench.csv").open() as f:
    assert len(list(csv.DictReader(f))) == 8
  assert bench_quantize.main(["--smoke", "--iters", "1", "--seconds", "1e-9", "--out", str(tmp_path)]) == 0
  with (tmp_path / "quantize.csv").open() as f:
    assert len(list(csv.DictReader(f))) == 5
  for mod in (bench, bench_quantize):
    with pytest.raises(SystemExit) as e:
      mod.main(["--seconds", "-1"])
    assert e.value.code == 2 and "--seconds must be >= 0" in capsys.readouterr().err


def test_full_sweep_starts_with_the_training_batch():
  assert bench.full_sweep()[0][0] == 16384 and bench.full_sweep()[-1] == (8192, 8192, 8192)


def test_no_gpu_iters_cap_is_said_and_documented(capsys, monkeypatch):
  """Without a GPU --iters is capped at 3 (interpret mode is slow): the run says so, --help too."""
  import jax
  import pytest
  from kernels_pallas import bench_quantize
  if any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("the cap applies only without a GPU")
  for mod in (bench, bench_quantize):
    got = []
    # run(shapes, [in_dtype,] iters, on_gpu, seconds): record the iters the sweep would get
    monkeypatch.setattr(mod, "run", lambda *args: got.append(args[-3]) or [])
    assert mod.main(["--smoke", "--iters", "7"]) == 0
    out = capsys.readouterr().out
    assert "no GPU: timing 3 calls per variant, not --iters 7 (interpret-mode Pallas is slow)" in out
    assert got == [3]
    assert mod.main(["--smoke", "--iters", "2"]) == 0  # under the cap: used as given, nothing said
    assert got[-1] == 2 and "not --iters" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
      mod.main(["--help"])
    assert e.value.code == 0 and "without a GPU at most 3" in " ".join(capsys.readouterr().out.split())


def test_empty_out_is_a_usage_error(tmp_path, capsys, monkeypatch):
  """`--out ""` was Path("."): the CSV (and PNG) landed in the current directory."""
  import pytest
  from kernels_pallas import bench_quantize
  monkeypatch.chdir(tmp_path)
  for mod in (bench, bench_quantize):
    monkeypatch.setattr(mod, "run", lambda *args: pytest.fail("the sweep started"))
    for out in ("", " "):
      with pytest.raises(SystemExit) as e:
        mod.main(["--smoke", "--iters", "1", "--out", out])
      assert e.value.code == 2 and "argument --out: needs a directory, got an empty path" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []


def test_ctrl_c_is_one_line_and_status_130(capsys):
  from kernels_pallas.bench import exit_with

  def interrupted():
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as info:
    exit_with(interrupted)
  assert info.value.code == 130
  assert capsys.readouterr().err == "interrupted (Ctrl-C): no outputs written\n"
  with pytest.raises(SystemExit) as info:
    exit_with(lambda: 1)
  assert info.value.code == 1
