"""python -m kernels_pallas.bench_quantize: the smoke sweep runs, checks outputs bitwise, writes CSV."""

import csv

import jax.numpy as jnp

from kernels_pallas import bench_quantize


def test_smoke_bench_runs_checks_and_writes(tmp_path):
  assert bench_quantize.main(["--smoke", "--iters", "1", "--out", str(tmp_path)]) == 0
  with (tmp_path / "quantize.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert {r["variant"] for r in rows} == {"xla_row", "jaxrec_row", "xla_block", "jaxrec_block",
                                          "jaxrec_block_kmajor"}
  assert len(rows) == 5 * len(bench_quantize.SMOKE)
  assert all(r["ok"] == "True" and r["mismatched_bytes"] == "0" for r in rows)


def test_mismatch_is_counted():
  q = jnp.zeros((4, 8), jnp.float8_e4m3fn)
  s = jnp.ones((4,), jnp.float32)
  assert bench_quantize.mismatched_bytes((q, s), (q, s)) == 0
  assert bench_quantize.mismatched_bytes((q.at[1, 2].set(1.0), s), (q, s)) == 1
  assert bench_quantize.mismatched_bytes((q, s * 2), (q, s)) > 0


def test_full_sweep_covers_the_issue_shapes():
  shapes = bench_quantize.full_sweep()
  assert len(shapes) == 9 and (65536, 4096) in shapes and (4096, 256) in shapes
