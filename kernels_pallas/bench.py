"""Benchmark jaxrec's FP8 GEMM kernels against the best XLA paths on recommendation shapes.

    python -m kernels_pallas.bench                    # GPU: the full sweep, CUPTI kernel times
    python -m kernels_pallas.bench --out runs/bench   # also writes bench.csv and bench.png
    python -m kernels_pallas.bench --smoke            # tiny sweep (the default without a GPU)

Variants per shape (M x K x N):
    xla_bf16      bf16 a [M, K] @ bf16 w [K, N]
    xla_fp8_nk    pre-quantized e4m3 a [M, K] and w [N, K], per-tensor scales, bf16 out: the layout
                  that makes XLA call cuBLASLt's FP8 GEMM (no per-call transpose or quantization)
    jaxrec_fp8    kernels_pallas.fp8_gemm_sm90, row-wise scales, bf16 out (tile multiples only)
Every output is checked against an f32 reference of the same operands (relative Frobenius error
within bf16 output rounding, 2^-7). On a GPU the time is the median of `--iters` calls of summed
CUPTI kernel time (jax.experimental.mosaic.gpu.profiler.measure) after a warm-up; without a GPU
the Pallas kernel runs in the Mosaic GPU interpreter and the wall-clock times are NOT speeds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.fp8_gemm_sm90 import fp8_gemm

M_SWEEP = (4096, 16384, 65536)
KN_SWEEP = ((256, 256), (512, 512), (1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096))
SMOKE = ((128, 128, 128), (256, 256, 256))
E4M3 = jnp.float8_e4m3fn
TOL = 2.0 ** -7


def full_sweep() -> list[tuple[int, int, int]]:
  return [(m, k, n) for m in M_SWEEP for k, n in KN_SWEEP] + [(8192, 8192, 8192)]


def _quantize(x: jax.Array, axis: int | None) -> tuple[jax.Array, jax.Array]:
  # the e4m3 per-tensor / row recipe of jaxrec.ops.fp8_scaling, restated here: kernels_pallas is
  # the bottom layer and imports nothing from jaxrec
  amax = jnp.max(jnp.abs(x)) if axis is None else jnp.max(jnp.abs(x), axis=axis)
  s = jnp.where(amax > 0, amax / 448.0, 1.0).astype(jnp.float32)
  xs = x / (s if axis is None else jnp.expand_dims(s, axis))
  return jnp.clip(xs, -448, 448).astype(E4M3), s


def variants(m: int, k: int, n: int, on_gpu: bool):
  """[(name, fn, args, reference f32 [M, N])] for one shape."""
  ka, kw = jax.random.split(jax.random.key(m * 31 + k * 7 + n))
  a = jax.random.normal(ka, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  a16, w16 = a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out = [("xla_bf16", jax.jit(lambda x, y: x @ y), (a16, w16),
          jnp.dot(a16.astype(jnp.float32), w16.astype(jnp.float32), precision="highest"))]

  a8, sa = _quantize(a, None)
  w8, sw = _quantize(w.T, None)  # (N, K), quantized once
  def xla_fp8(x8, y8, s):
    y = jax.lax.dot_general(x8, y8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
    return (y * s).astype(jnp.bfloat16)
  ref8 = jnp.dot(a8.astype(jnp.float32), w8.astype(jnp.float32).T, precision="highest") * (sa * sw)
  out.append(("xla_fp8_nk", jax.jit(xla_fp8), (a8, w8, sa * sw), ref8))

  if m % 128 == 0 and n % 128 == 0 and k % 128 == 0:
    ar, sar = _quantize(a, 1)
    wr, swr = _quantize(w.T, 1)
    kern = jax.jit(lambda x, y, s1, s2: fp8_gemm(x, y, s1, s2, interpret=not on_gpu))
    refr = (jnp.dot(ar.astype(jnp.float32), wr.astype(jnp.float32).T, precision="highest")
            * sar[:, None] * swr[None, :])
    out.append(("jaxrec_fp8", kern, (ar, wr, sar, swr), refr))
  return out


def time_us(fn, args, iters: int, on_gpu: bool) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  if on_gpu:
    from jax.experimental.mosaic.gpu import profiler
    _, ms = profiler.measure(fn, iterations=iters)(*args)
    return 1e3 * statistics.median(ms if isinstance(ms, list) else [ms])
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e6 * statistics.median(times)


def run(shapes, iters: int, on_gpu: bool) -> list[dict]:
  rows = []
  for m, k, n in shapes:
    base = None
    for name, fn, args, ref in variants(m, k, n, on_gpu):
      y = jax.block_until_ready(fn(*args)).astype(jnp.float32)
      err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
      us = time_us(fn, args, iters, on_gpu)
      tfs = 2.0 * m * k * n / (us * 1e-6) / 1e12
      base = us if name == "xla_bf16" else base
      rows.append(dict(m=m, k=k, n=n, variant=name, us=us, tflops=tfs, speedup_vs_bf16=base / us,
                       rel_err=err, ok=err <= TOL))
      print(f"{m:>6}x{k:>5}x{n:>5}  {name:<11} {us:>10.1f} us  {tfs:>7.1f} TF/s  "
            f"x{base / us:5.2f} vs bf16  err {err:.2e} {'ok' if err <= TOL else 'WRONG'}", flush=True)
  return rows


def write_outputs(rows: list[dict], out: Path, on_gpu: bool) -> None:
  out.mkdir(parents=True, exist_ok=True)
  with (out / "bench.csv").open("w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
  from matplotlib.figure import Figure
  shapes = sorted({(r["m"], r["k"], r["n"]) for r in rows})
  names = list(dict.fromkeys(r["variant"] for r in rows))
  fig = Figure(figsize=(max(8, 0.7 * len(shapes)), 4.5), layout="constrained")
  ax = fig.add_subplot()
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    vals = [next((r["tflops"] for r in rows if (r["m"], r["k"], r["n"]) == s and r["variant"] == name), 0.0)
            for s in shapes]
    ax.bar(np.arange(len(shapes)) + i * width, vals, width, label=name)
  ax.set_xticks(np.arange(len(shapes)) + width * (len(names) - 1) / 2,
                [f"{m}x{k}x{n}" for m, k, n in shapes], rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("TF/s" if on_gpu else "TF/s (CPU interpreter: not a speed)")
  ax.set_title(f"FP8 GEMM, {jax.devices()[0].device_kind}")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  fig.savefig(out / "bench.png", dpi=120)
  print(f"wrote {out / 'bench.csv'} and {out / 'bench.png'}")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m kernels_pallas.bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sweep (default when there is no GPU)")
  p.add_argument("--iters", type=int, default=20, help="timed calls per variant (median reported)")
  p.add_argument("--out", type=Path, default=None, help="also write bench.csv and bench.png here")
  a = p.parse_args(argv)
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  smoke = a.smoke or not on_gpu
  if not on_gpu:
    print("no GPU: running the smoke sweep with the Pallas kernel in the Mosaic GPU interpreter; "
          "times below are CPU wall-clock, not kernel speeds")
  rows = run(SMOKE if smoke else full_sweep(), a.iters if on_gpu else min(a.iters, 3), on_gpu)
  if a.out is not None:
    write_outputs(rows, a.out, on_gpu)
  bad = [r for r in rows if not r["ok"]]
  if bad:
    print(f"error: {len(bad)} outputs differ from the reference beyond {TOL:.1e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
