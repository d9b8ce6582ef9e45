"""Benchmark the FP8 quantize kernel against XLA's jnp quantization (memory-bound: GB/s).

    python -m kernels_pallas.bench_quantize                     # GPU: the full sweep, CUPTI kernel times
    python -m kernels_pallas.bench_quantize --out runs/quant    # also writes quantize.csv
    python -m kernels_pallas.bench_quantize --smoke             # tiny sweep (the default without a GPU)

Shapes M in {4096, 16384, 65536} x K in {256, 1024, 4096}, x bf16 (`--in-dtype float32` for f32),
q float8_e4m3fn. Variants per shape:
    xla_row / xla_block       the jnp recipe as jaxrec.ops.fp8_scaling writes it, jitted (XLA's fusions)
    jaxrec_row / jaxrec_block fp8_quantize_sm90.fp8_quantize (block: scales [M, K/128], which adds one
                              small XLA transpose of the kernel's K-major scales)
    jaxrec_block_kmajor       the kernel alone, scales left K-major [K/128, M]
GB/s counts the bytes a quantization must move at least (read x, write q and the f32 scales), so
it is an effective bandwidth: a path that reads x twice shows up as a lower number. "hbm" is the
fraction of the H100's 3.35 TB/s HBM3 peak. Every output, XLA's included, is checked bit for bit
against fp8_quantize_reference on the same device (the count of differing bytes is printed; on CPU
XLA's row recipe may differ next to fp8 rounding ties, see fp8_quantize_sm90). On a GPU the time is the
median of `--iters` calls of summed CUPTI kernel time (jax.experimental.mosaic.gpu.profiler.measure)
after a warm-up; without a GPU the kernel runs in the Mosaic GPU interpreter, `--iters` is capped at 3
(said so when it applies) and the wall-clock times are NOT speeds.
"""

from __future__ import annotations

import csv
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.bench import exit_with, parse_sweep_args, sweep_parser, time_us, within
from kernels_pallas.fp8_quantize_sm90 import fp8_quantize, fp8_quantize_reference, hbm_bytes

M_SWEEP = (4096, 16384, 65536)
K_SWEEP = (256, 1024, 4096)
SMOKE = ((64, 256), (24, 200))
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 peak
E4M3 = jnp.float8_e4m3fn


def full_sweep() -> list[tuple[int, int]]:
  return [(m, k) for m in M_SWEEP for k in K_SWEEP]


def xla_quantize(x: jax.Array, recipe: str) -> tuple[jax.Array, jax.Array]:
  """The recipe as jaxrec.ops.fp8_scaling.quantize_lhs writes it (kernels_pallas imports nothing
  from jaxrec), e4m3: what XLA makes of plain jnp, without the reference's optimization barrier."""
  fmax = 448.0
  if recipe == "row":
    amax = jnp.max(jnp.abs(x), axis=1).astype(jnp.float32)
    s = jnp.where(amax > 0, amax / fmax, 1.0)
    return jnp.clip(x.astype(jnp.float32) / s[:, None], -fmax, fmax).astype(E4M3), s
  m, k = x.shape
  x = jnp.pad(x, ((0, 0), (0, (-k) % 128)))
  amax = jnp.max(jnp.abs(x.reshape(m, -1, 128)), axis=2).astype(jnp.float32)
  s = jnp.where(amax > 0, amax / fmax, 1.0)
  return jnp.clip(x.astype(jnp.float32) / jnp.repeat(s, 128, axis=1), -fmax, fmax).astype(E4M3), s


def variants(recipe: str, on_gpu: bool):
  """[(name, jitted fn of x, converts its output to the reference's (q, scale) layout)]."""
  kern = functools.partial(fp8_quantize, recipe=recipe, dtype=E4M3, interpret=not on_gpu)
  out = [(f"xla_{recipe}", jax.jit(functools.partial(xla_quantize, recipe=recipe)), lambda o: o),
         (f"jaxrec_{recipe}", jax.jit(kern), lambda o: o)]
  if recipe == "block":
    out.append(("jaxrec_block_kmajor", jax.jit(functools.partial(kern, k_major_scales=True)),
                lambda o: (o[0], o[1].T)))
  return out


def mismatched_bytes(got, want) -> int:
  """Bytes of q and scale that differ bitwise (a shape mismatch counts as everything)."""
  n = 0
  for g, w in zip(got, want, strict=True):
    g, w = np.asarray(g), np.asarray(w)
    if g.shape != w.shape or g.dtype != w.dtype:
      return max(g.nbytes, w.nbytes, 1)
    n += int(np.count_nonzero(g.view(np.uint8) != w.view(np.uint8)))
  return n


def run(shapes, in_dtype, iters: int, on_gpu: bool, seconds: float = 0.0) -> list[dict]:
  """Every variant of each shape in order; with `seconds` > 0 no new shape starts after that long."""
  rows = []
  for m, k in within(shapes, seconds):
    x = jax.random.normal(jax.random.key(m * 31 + k), (m, k), jnp.float32)
    x = (x * jnp.exp(2.0 * jax.random.normal(jax.random.key(k), (m, 1)))).astype(in_dtype)
    for recipe in ("row", "block"):
      nbytes = hbm_bytes(m, k, recipe, in_dtype)
      ref = jax.jit(functools.partial(fp8_quantize_reference, recipe=recipe, dtype=E4M3))(x)
      for name, fn, to_ref_layout in variants(recipe, on_gpu):
        bad = mismatched_bytes(to_ref_layout(jax.block_until_ready(fn(x))), ref)
        us = time_us(fn, (x,), iters, on_gpu)
        gbs = nbytes / (us * 1e-6) / 1e9
        rows.append(dict(m=m, k=k, in_dtype=jnp.dtype(in_dtype).name, variant=name, us=us, gb_s=gbs,
                         hbm_fraction=gbs * 1e9 / HBM_BYTES_PER_S, mismatched_bytes=bad, ok=bad == 0))
        print(f"{m:>6}x{k:>5}  {name:<20} {us:>10.1f} us  {gbs:>8.1f} GB/s  "
              f"{100 * gbs * 1e9 / HBM_BYTES_PER_S:5.1f}% hbm  {'ok' if bad == 0 else f'WRONG ({bad} bytes)'}",
              flush=True)
  return rows


def write_csv(rows: list[dict], out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  with (out / "quantize.csv").open("w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
  print(f"wrote {out / 'quantize.csv'}")


def main(argv: list[str] | None = None) -> int:
  p = sweep_parser("python -m kernels_pallas.bench_quantize", __doc__.split("\n\n")[0],
                   "also write quantize.csv here")
  p.add_argument("--in-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="dtype of the operand quantized (default bfloat16)")
  a, on_gpu, smoke = parse_sweep_args(p, argv)
  rows = run(SMOKE if smoke else full_sweep(), jnp.dtype(a.in_dtype), a.iters, on_gpu, a.seconds)
  if a.out is not None:
    write_csv(rows, a.out)
  bad = [r for r in rows if not r["ok"]]
  if bad:
    print(f"error: {len(bad)} outputs differ bitwise from fp8_quantize_reference", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  exit_with(main)
