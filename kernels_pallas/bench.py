"""Benchmark jaxrec's FP8 GEMM kernels against the best XLA paths on recommendation shapes.

    python -m kernels_pallas.bench                    # GPU: the full sweep, CUPTI kernel times
    python -m kernels_pallas.bench --out runs/bench   # also writes bench.csv and bench.png
    python -m kernels_pallas.bench --smoke            # tiny sweep (the default without a GPU)

Variants per shape (M x K x N), two ops:
  op "gemm": y = a @ w, bf16 out
    xla_bf16          bf16 a [M, K] @ bf16 w [K, N]
    xla_fp8_nk        pre-quantized e4m3 a [M, K] and w [N, K], per-tensor scales, bf16 out: the layout
                      that makes XLA call cuBLASLt's FP8 GEMM (no per-call transpose or quantization)
    jaxrec_fp8        kernels_pallas.fp8_gemm_sm90.fp8_gemm, row-wise scales, bf16 out
    xla_fp8_block_nk  pre-quantized e4m3 a [M, K] and w [N, K] with block-wise scales (1 x 128 / 128 x 128),
                      as jaxrec.ops.fp8_scaling.scaled_matmul computes it in XLA: one batched FP8 dot over
                      the K blocks into f32 [M, K/128, N], scaled and summed (memory: 4 M N K/128 bytes)
    jaxrec_fp8_block  fp8_gemm_blockwise, the same block-wise operands, scales promoted inside the K loop
  op "layer": y = hard_swish(block_norm(a @ w)), BlockNorm over 256-feature blocks (min(256, N)), bf16 out
    xla_bf16_layer    bf16 matmul, then the jnp BlockNorm + HardSwish epilogue (XLA fuses it after the GEMM)
    xla_fp8_nk_layer  the xla_fp8_nk GEMM, then the same jnp epilogue
    jaxrec_fp8_layer  fp8_gemm(norm="block", activation="hard_swish"), row-wise scales: the whole layer
                      (GEMM -> BlockNorm -> HardSwish -> bf16) in one kernel
TF/s counts the GEMM's 2 M N K for both ops; speedups are against the op's XLA bf16 variant.
Every output is checked against an f32 reference of the same operands (relative Frobenius error
within bf16 output rounding, 2^-7). On a GPU the time is the median of `--iters` calls of summed
CUPTI kernel time (jax.experimental.mosaic.gpu.profiler.measure) after a warm-up; without a GPU
the Pallas kernel runs in the Mosaic GPU interpreter, `--iters` is capped at 3 (said so when it applies)
and the wall-clock times are NOT speeds.
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

from kernels_pallas.fp8_gemm_sm90 import epilogue_reference, fp8_gemm, fp8_gemm_blockwise

M_SWEEP = (4096, 16384, 65536)
KN_SWEEP = ((256, 256), (512, 512), (1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096))
SMOKE = ((128, 128, 128), (256, 256, 256))
E4M3 = jnp.float8_e4m3fn
BLOCK = 128  # the block recipe's block
TOL = 2.0 ** -7
CPU_ITERS = 3  # --iters' cap without a GPU: the Pallas interpreter is slow


def full_sweep() -> list[tuple[int, int, int]]:
  """The GPU sweep, most telling first (a `--seconds` budget cuts its tail): training-batch M 16384,
  then 65536, then 4096, then the square 8192^3."""
  order = sorted(M_SWEEP, key=lambda m: (m != 16384, m != 65536))
  return [(m, k, n) for m in order for k, n in KN_SWEEP] + [(8192, 8192, 8192)]


def _quantize(x: jax.Array, axis: int | None) -> tuple[jax.Array, jax.Array]:
  # the e4m3 per-tensor / row recipe of jaxrec.ops.fp8_scaling, restated here: kernels_pallas is
  # the bottom layer and imports nothing from jaxrec
  amax = jnp.max(jnp.abs(x)) if axis is None else jnp.max(jnp.abs(x), axis=axis)
  s = jnp.where(amax > 0, amax / 448.0, 1.0).astype(jnp.float32)
  xs = x / (s if axis is None else jnp.expand_dims(s, axis))
  return jnp.clip(xs, -448, 448).astype(E4M3), s


def _quantize_act_blocks(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [M, K] -> (e4m3 [M, K], scales [M, K/128]): one scale per 1 x 128 block (recipe "block")."""
  r, k = x.shape
  s = jnp.max(jnp.abs(x.reshape(r, k // BLOCK, BLOCK)), axis=2)
  s = jnp.where(s > 0, s / 448.0, 1.0).astype(jnp.float32)
  q = jnp.clip(x / jnp.repeat(s, BLOCK, axis=1), -448, 448).astype(E4M3)
  return q, s


def _quantize_weight_blocks(w_nk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w [N, K] -> (e4m3 [N, K], scales [N/128, K/128]): one scale per 128 x 128 block."""
  n, k = w_nk.shape
  s = jnp.max(jnp.abs(w_nk.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)), axis=(1, 3))
  s = jnp.where(s > 0, s / 448.0, 1.0).astype(jnp.float32)
  full = jnp.repeat(jnp.repeat(s, BLOCK, axis=0), BLOCK, axis=1)
  return jnp.clip(w_nk / full, -448, 448).astype(E4M3), s


def _block_dot_f32(a8, w8, sa, sw, precision=None):
  """The block recipe in XLA (jaxrec.ops.fp8_scaling.scaled_matmul's formulation), f32 [M, N]."""
  m, k = a8.shape
  n, kb = w8.shape[0], k // BLOCK
  parts = jnp.einsum("mkc,nkc->mkn", a8.reshape(m, kb, BLOCK), w8.reshape(n, kb, BLOCK),
                     preferred_element_type=jnp.float32, precision=precision)
  return jnp.sum(parts * sa[:, :, None] * jnp.repeat(sw, BLOCK, axis=0).T[None], axis=1)


def _layer_epilogue(y: jax.Array) -> jax.Array:
  return epilogue_reference(y, norm="block", activation="hard_swish").astype(jnp.bfloat16)


def _ref_dot(a, b_nk):
  return jnp.dot(a.astype(jnp.float32), b_nk.astype(jnp.float32).T, precision="highest")


def variants(m: int, k: int, n: int, on_gpu: bool):
  """[(op, name, fn, args, reference f32 [M, N])] for one shape."""
  interpret = not on_gpu
  ka, kw = jax.random.split(jax.random.key(m * 31 + k * 7 + n))
  a = jax.random.normal(ka, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
  a16, w16 = a.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  ref16 = jnp.dot(a16.astype(jnp.float32), w16.astype(jnp.float32), precision="highest")
  out = [("gemm", "xla_bf16", jax.jit(lambda x, y: x @ y), (a16, w16), ref16)]

  a8, sa = _quantize(a, None)
  w8, sw = _quantize(w.T, None)  # (N, K), quantized once
  def xla_fp8(x8, y8, s):
    y = jax.lax.dot_general(x8, y8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
    return (y * s).astype(jnp.bfloat16)
  ref8 = _ref_dot(a8, w8) * (sa * sw)
  out.append(("gemm", "xla_fp8_nk", jax.jit(xla_fp8), (a8, w8, sa * sw), ref8))

  ar, sar = _quantize(a, 1)
  wr, swr = _quantize(w.T, 1)
  kern = jax.jit(lambda x, y, s1, s2: fp8_gemm(x, y, s1, s2, interpret=interpret))
  refr = _ref_dot(ar, wr) * sar[:, None] * swr[None, :]
  out.append(("gemm", "jaxrec_fp8", kern, (ar, wr, sar, swr), refr))

  if k % BLOCK == 0 and n % BLOCK == 0:  # the block recipe's own constraint (its quantizer pads)
    ab, sab = _quantize_act_blocks(a)
    wb, swb = _quantize_weight_blocks(w.T)
    refb = _block_dot_f32(ab.astype(jnp.float32), wb.astype(jnp.float32), sab, swb, precision="highest")
    out.append(("gemm", "xla_fp8_block_nk",
                jax.jit(lambda x, y, s1, s2: _block_dot_f32(x, y, s1, s2).astype(jnp.bfloat16)),
                (ab, wb, sab, swb), refb))
    kernb = jax.jit(lambda x, y, s1, s2: fp8_gemm_blockwise(x, y, s1, s2, interpret=interpret))
    out.append(("gemm", "jaxrec_fp8_block", kernb, (ab, wb, sab, swb), refb))

  if n % min(256, n) == 0:  # BlockNorm's block structure
    epi = lambda y: epilogue_reference(y, norm="block", activation="hard_swish")
    out.append(("layer", "xla_bf16_layer", jax.jit(lambda x, y: _layer_epilogue(x @ y)), (a16, w16),
                epi(ref16)))
    out.append(("layer", "xla_fp8_nk_layer", jax.jit(lambda *args: _layer_epilogue(xla_fp8(*args))),
                (a8, w8, sa * sw), epi(ref8)))
    kern_layer = jax.jit(lambda x, y, s1, s2: fp8_gemm(x, y, s1, s2, norm="block", activation="hard_swish",
                                                       interpret=interpret))
    out.append(("layer", "jaxrec_fp8_layer", kern_layer, (ar, wr, sar, swr), epi(refr)))
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


def within(shapes: list, seconds: float):
  """The shapes in order, none started once `seconds` have passed since the first (0 = no limit)."""
  t0 = time.perf_counter()
  for i, shape in enumerate(shapes):
    if seconds > 0 and i > 0 and time.perf_counter() - t0 > seconds:
      print(f"stopped after {i} of {len(shapes)} shapes: --seconds {seconds:g} reached", flush=True)
      return
    yield shape


def run(shapes, iters: int, on_gpu: bool, seconds: float = 0.0) -> list[dict]:
  """Every variant of each shape in order; with `seconds` > 0 no new shape starts after that long."""
  rows = []
  for m, k, n in within(shapes, seconds):
    base = {}
    for op, name, fn, args, ref in variants(m, k, n, on_gpu):
      y = jax.block_until_ready(fn(*args)).astype(jnp.float32)
      err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
      us = time_us(fn, args, iters, on_gpu)
      tfs = 2.0 * m * k * n / (us * 1e-6) / 1e12
      base.setdefault(op, us)  # each op's first variant is its XLA bf16 baseline
      rows.append(dict(m=m, k=k, n=n, op=op, variant=name, us=us, tflops=tfs,
                       speedup_vs_bf16=base[op] / us, rel_err=err, ok=err <= TOL))
      print(f"{m:>6}x{k:>5}x{n:>5}  {name:<17} {us:>10.1f} us  {tfs:>7.1f} TF/s  "
            f"x{base[op] / us:5.2f} vs bf16  err {err:.2e} {'ok' if err <= TOL else 'WRONG'}", flush=True)
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
  by_key = {((r["m"], r["k"], r["n"]), r["variant"]): r for r in rows}
  for i, name in enumerate(names):
    x = np.arange(len(shapes)) + i * width
    got = [by_key.get((sh, name)) for sh in shapes]
    # log scale: interpreted Pallas runs ~1000x below XLA on CPU and would not show on a linear one;
    # a variant not run on a shape has no bar (NaN), not a 0 that reads as "very slow"
    bars = ax.bar(x, [np.nan if r is None else r["tflops"] for r in got], width, label=name)
    for bar, r in zip(bars, got):
      if r is not None and not r["ok"]:  # a wrong output is no speed: hatched red
        bar.set(hatch="xx", edgecolor="red")
  ax.set_yscale("log")
  ax.set_xticks(np.arange(len(shapes)) + width * (len(names) - 1) / 2,
                [f"{m}x{k}x{n}" for m, k, n in shapes], rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("TF/s (2MNK / time; layer: its GEMM's)" if on_gpu else
                "TF/s, CPU: not a speed (Pallas interpreted)")
  ax.set_title(f"FP8 GEMM and fused GEMM -> BlockNorm -> HardSwish, {jax.devices()[0].device_kind}"
               + ("; hatched red: output differs from the reference" if any(not r["ok"] for r in rows) else ""),
               fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  ax.grid(axis="y", alpha=0.3)
  fig.savefig(out / "bench.png", dpi=120)
  print(f"wrote {out / 'bench.csv'} and {out / 'bench.png'}")


def _out_dir(text: str) -> Path:
  """--out's type: "" would be the current directory, which nobody means."""
  if not text.strip():
    raise argparse.ArgumentTypeError("needs a directory, got an empty path")
  return Path(text)


def sweep_parser(prog: str, description: str, out_help: str) -> argparse.ArgumentParser:
  """The options of both kernel benchmarks (this one and bench_quantize): --smoke, --iters, --out,
  --seconds; `parse_sweep_args` checks them."""
  p = argparse.ArgumentParser(prog=prog, description=description)
  p.add_argument("--smoke", action="store_true", help="tiny sweep (default when there is no GPU)")
  p.add_argument("--iters", type=int, default=20,
                 help=f"timed calls per variant (median reported); without a GPU at most {CPU_ITERS}, since "
                      "interpret-mode Pallas is slow")
  p.add_argument("--out", type=_out_dir, default=None, help=out_help)
  p.add_argument("--seconds", type=float, default=0.0,
                 help="start no new shape after this many seconds (0 = no limit), so that a time-boxed run "
                      "still writes its outputs")
  return p


def parse_sweep_args(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, bool, bool]:
  """(args, on_gpu, smoke): the options checked (a usage error otherwise) and --out created before the
  sweep, not after it; without a GPU the smoke sweep and at most CPU_ITERS timed calls (`a.iters` is
  lowered), both said so."""
  a = p.parse_args(argv)
  if a.iters < 1:
    p.error(f"--iters must be >= 1, got {a.iters}")
  if not 0 <= a.seconds < float("inf"):
    p.error(f"--seconds must be >= 0 and finite, got {a.seconds}")
  if a.out is not None:
    try:
      a.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      p.error(f"--out {a.out}: cannot create the directory ({e.strerror or e})")
  on_gpu = any(d.platform == "gpu" for d in jax.devices())
  if not on_gpu:
    print("no GPU: running the smoke sweep with the Pallas kernel in the Mosaic GPU interpreter; "
          "times below are CPU wall-clock, not kernel speeds")
    if a.iters > CPU_ITERS:
      print(f"no GPU: timing {CPU_ITERS} calls per variant, not --iters {a.iters} (interpret-mode Pallas is slow)")
      a.iters = CPU_ITERS
  return a, on_gpu, a.smoke or not on_gpu


def main(argv: list[str] | None = None) -> int:
  p = sweep_parser("python -m kernels_pallas.bench", __doc__.split("\n\n")[0],
                   "also write bench.csv and bench.png here")
  a, on_gpu, smoke = parse_sweep_args(p, argv)
  rows = run(SMOKE if smoke else full_sweep(), a.iters, on_gpu, a.seconds)
  if a.out is not None:
    write_outputs(rows, a.out, on_gpu)
  bad = [r for r in rows if not r["ok"]]
  if bad:
    print(f"error: {len(bad)} outputs differ from the reference beyond {TOL:.1e}", file=sys.stderr)
    return 1
  return 0


def exit_with(main) -> None:
  """sys.exit(main()); Ctrl-C is one line and exit status 130, not a traceback (outputs are written
  at the end of a sweep, so an interrupted one writes none)."""
  try:
    status = main()
  except KeyboardInterrupt:
    print("interrupted (Ctrl-C): no outputs written", file=sys.stderr)
    status = 130
  sys.exit(status)


if __name__ == "__main__":
  exit_with(main)
