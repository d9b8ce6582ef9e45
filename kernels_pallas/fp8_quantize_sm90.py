"""FP8 quantization for Hopper (sm90) in Pallas Mosaic GPU: amax, scale and cast in one HBM pass.

    x [M, K] bf16/f32 -> q [M, K] fp8, scale f32, with q = clip(x / scale, -fmax, fmax)

Two recipes, the activation ("lhs") recipes of jaxrec.ops.fp8_scaling.quantize_lhs, restated
here bit for bit (kernels_pallas imports nothing from jaxrec):
    "row"    scale [M]: amax over each row / fmax
    "block"  scale [M, K'/128]: amax over each 1 x 128 block of a row / fmax, with K zero-padded
             to K' = 128 * ceil(K / 128); q is [M, K'] (the padding quantizes to 0)
scale = amax / fmax, or 1 where amax is 0 (a zero row or block quantizes to zeros), and at least
SCALE_MIN (the smallest normal f32, so a tiny amax never gives a scale that flushes to 0); fmax is 448
for float8_e4m3fn and 57344 for float8_e5m2. The clip is a guard: with the scale taken from the
operand's own amax, x / scale stays within +-fmax for finite inputs (no random amax was found to
break it), but casting an out-of-range value to float8_e4m3fn gives NaN. quantize_lhs returns the
row scale as [M, 1]; here it is [M], the layout fp8_gemm_sm90.fp8_gemm takes (`scale[:, 0]`
converts). Inputs are assumed finite.

Rounding, bit for bit with what XLA compiles fp8_scaling's jnp into:
  - scale: XLA's algebraic simplifier turns `amax / fmax` (a constant divisor) into
    `amax * (1 / fmax)` with 1 / fmax rounded to f32, on every backend; that differs from the
    correctly rounded quotient for about half of all amax values. The kernel multiplies likewise
    (Mosaic would divide exactly), and so does the reference, without relying on the rewrite.
  - q: the correctly rounded f32 quotient x / scale, as written in fp8_scaling and as XLA:GPU
    computes it. On CPU only, the simplifier also rewrites `x / broadcast(s)` into
    `x * broadcast(1 / s)`, which can move an fp8 rounding when x / scale lies within an f32 ulp
    of a rounding tie: there quantize_lhs's row recipe (not its block recipe, whose divisor is a
    repeat) differs from this definition, 1 to 4 elements in 16.8M of log-normal random data,
    none in the tests' draws. The reference blocks that rewrite. Multiplying by a reciprocal
    would be cheaper in the kernel, but fp8_scaling would have to change with it.

Weights: fp8_gemm consumes the weight stored (N, K), so a weight W [K, N] is quantized once as
W^T [N, K] with the row recipe: `qw, sw = fp8_quantize(W.T)` gives qw [N, K] and sw [N] (one
scale per output column), the same values as quantize_rhs(W, dtype, "row") transposed. The
block recipe here is the 1 x 128 activation recipe only; 128 x 128 weight blocks are not built.

Kernel: one program per `block_m` rows, one warpgroup. A single bulk copy brings the program's
[block_m, K'] rows (contiguous in HBM) into shared memory; the warpgroup walks them in groups of
R rows (8 for 2-byte input, 4 for f32; each warp owns whole rows, so row and block maxima reduce
with warp shuffles only) and 128-column chunks: the row recipe reads each chunk twice from shared
memory (amax, then cast), the block recipe once. q and the scales go back with bulk / TMA copies.
Several programs share an SM (the default tile is about 32 KiB of input), which is what overlaps
loads with compute. Block scales are produced K-major, [K'/128, M] (a row's block scales are not
contiguous in shared memory); the wrapper transposes them to [M, K'/128] with one small XLA op
unless `k_major_scales=True`.

Shapes: K is zero-padded to a multiple of 128 (for the row recipe q is sliced back to [M, K]) and
M to a multiple of the row tile; padding costs an extra copy of x, so shapes that need none are
the fast path. A row tile that does not fit in shared memory (padded K above 8320 for bf16,
10112 for f32) raises NotImplementedError naming the constraint.
Checked bit-exact against the reference on CPU through jax's Mosaic GPU interpreter
(`interpret=True`) and lowered for sm90; not yet run or timed on an H100
(python -m kernels_pallas.bench_quantize does both).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK = 128
RECIPES = ("row", "block")
FP8_TYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
IN_TYPES = (jnp.bfloat16, jnp.float32)
SMEM_BYTES = 200 * 1024  # of the 227 KiB an H100 block may use; the rest for Mosaic's own scratch
F32 = jnp.float32
SCALE_MIN = float(np.finfo(np.float32).tiny)  # jaxrec.ops.fp8_scaling.SCALE_MIN


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """block_m: rows per program (None: the largest power of two <= 64 whose input tile fits
  `tile_bytes` and divides the padded M); unroll: 128-column chunks per loop iteration."""
  block_m: int | None = None
  tile_bytes: int = 32 * 1024
  unroll: int = 2

  def __post_init__(self):
    if self.block_m is not None and not (0 < self.block_m <= 256 and self.block_m % 4 == 0):
      # 256: the longest TMA box dimension (the block scales' tile is [K/128, block_m])
      raise ValueError(f"block_m must be a multiple of 4 in [4, 256], got {self.block_m}")
    if self.tile_bytes <= 0 or self.unroll < 1:
      raise ValueError("tile_bytes must be > 0 and unroll >= 1")


def _fmax(dtype) -> float:
  return float(jnp.finfo(dtype).max)


def _inv_fmax(dtype) -> np.float32:
  """1 / fmax rounded to f32: scale = amax * _inv_fmax, which is what XLA makes of amax / fmax."""
  return np.float32(1.0) / np.float32(_fmax(dtype))


def _row_group(in_dtype) -> tuple[int, plgpu.SomeLayout]:
  """Rows per register chunk, and the layout of an [R, 128] chunk: 16-byte vectors along K,
  each warp holding whole rows (bf16: 2 rows x 16 lanes x 8; f32: 1 row x 32 lanes x 4)."""
  if jnp.dtype(in_dtype).itemsize == 2:
    return 8, plgpu.Layout.TILED(plgpu.Tiling(((8, BLOCK), (2, BLOCK), (8,))), warp_dims=(-5,),
                                 lane_dims=(-3, -2), vector_dim=-1)
  return 4, plgpu.Layout.TILED(plgpu.Tiling(((4, BLOCK), (4,))), warp_dims=(-3,), lane_dims=(-2,),
                               vector_dim=-1)


def _check(x, recipe, dtype):
  if recipe not in RECIPES:
    raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r} (per-tensor scaling needs "
                     "a global amax; use jaxrec.ops.fp8_scaling)")
  if x.ndim != 2:
    raise ValueError(f"fp8_quantize needs x [M, K], got shape {x.shape}")
  if x.dtype not in IN_TYPES:
    raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
  if jnp.dtype(dtype) not in FP8_TYPES:
    raise ValueError(f"dtype must be float8_e4m3fn or float8_e5m2, got {jnp.dtype(dtype)}")


def _smem_bytes(bm: int, k: int, in_dtype) -> int:
  return bm * k * (jnp.dtype(in_dtype).itemsize + 1) + (k // BLOCK) * bm * 4


def _block_m(m: int, k: int, in_dtype, cfg: TuningConfig) -> int:
  """Rows per program for padded M `m` and padded K `k`; raises if no tile fits."""
  r, _ = _row_group(in_dtype)
  if _smem_bytes(r, k, in_dtype) > SMEM_BYTES:
    raise NotImplementedError(
        f"fp8_quantize: K={k} is too large: a row tile of {r} rows needs "
        f"{_smem_bytes(r, k, in_dtype)} bytes of shared memory (limit {SMEM_BYTES}); use the XLA "
        "path (jaxrec.ops.fp8_scaling.quantize_lhs)")
  if cfg.block_m is not None:
    if cfg.block_m % r:
      raise ValueError(f"block_m={cfg.block_m} must be a multiple of {r} for {jnp.dtype(in_dtype)} input")
    if _smem_bytes(cfg.block_m, k, in_dtype) > SMEM_BYTES:
      raise ValueError(f"block_m={cfg.block_m} with K={k} needs {_smem_bytes(cfg.block_m, k, in_dtype)} "
                       f"bytes of shared memory (limit {SMEM_BYTES}); lower block_m")
    return cfg.block_m
  bm = r
  while (bm * 2 <= 64 and m % (bm * 2) == 0
         and bm * 2 * k * jnp.dtype(in_dtype).itemsize <= cfg.tile_bytes):
    bm *= 2
  return bm


def _loop(n: int, unroll: int, fn: Callable, carry):
  """carry = fn(j, carry) for j in range(n): a fori_loop of `unroll` inlined steps, then the rest."""
  steps = n // unroll
  if steps:
    def body(i, c):
      for u in range(unroll):
        c = fn(i * unroll + u, c)
      return c
    carry = lax.fori_loop(0, steps, body, carry) if steps > 1 else body(0, carry)
  for j in range(steps * unroll, n):
    carry = fn(j, carry)
  return carry


def _quantize_call(x: jax.Array, recipe: str, dtype, bm: int, unroll: int, interpret: bool):
  """Padded x [M, K] (M % bm == 0, K % 128 == 0) -> q [M, K], scale [M] (row) or [K/128, M]."""
  m, k = x.shape
  kb = k // BLOCK
  fmax, inv_fmax = _fmax(dtype), _inv_fmax(dtype)
  r, layout = _row_group(x.dtype)

  def kernel(x_gmem, q_gmem, s_gmem, x_smem, q_smem, s_smem, barrier):
    rows = pl.ds(lax.axis_index("m") * bm, bm)
    # in bounds by construction (M, K padded); this also selects the plain bulk copy, which has no
    # 256-element limit per dimension
    plgpu.copy_gmem_to_smem(x_gmem.at[rows], x_smem, barrier.at[0],
                            oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
    plgpu.barrier_wait(barrier.at[0])

    def group(g, carry):
      grp = pl.ds(g * r, r)

      def chunk(j):  # [R, 128] f32
        return plgpu.load(x_smem.at[grp, pl.ds(j * BLOCK, BLOCK)], layout=layout).astype(F32)

      def chunk_amax(v):  # [R]
        return jnp.max(jnp.abs(v), axis=1)

      def scale_of(amax):  # a multiply, not amax / fmax: see _inv_fmax
        return jnp.where(amax > 0, jnp.maximum(amax * inv_fmax, SCALE_MIN), 1.0)

      def store_q(j, v, scale):
        s = plgpu.layout_cast(lax.broadcast_in_dim(scale, (r, BLOCK), [0]), layout)
        q = jnp.minimum(jnp.maximum(v / s, -fmax), fmax).astype(dtype)
        q_smem.at[grp, pl.ds(j * BLOCK, BLOCK)][...] = q

      if recipe == "row":
        amax = _loop(kb - 1, unroll, lambda j, a: jnp.maximum(a, chunk_amax(chunk(j + 1))),
                     chunk_amax(chunk(0)))
        scale = scale_of(amax)

        def cast_step(j, c):
          store_q(j, chunk(j), scale)
          return c

        _loop(kb, unroll, cast_step, 0)
        s_smem.at[grp][...] = scale
      else:
        def block_step(j, c):
          v = chunk(j)
          scale = scale_of(chunk_amax(v))
          store_q(j, v, scale)
          s_smem.at[j, grp][...] = scale
          return c

        _loop(kb, unroll, block_step, 0)
      return carry

    lax.fori_loop(0, bm // r, group, 0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, q_gmem.at[rows])
    plgpu.copy_smem_to_gmem(s_smem, s_gmem.at[rows] if recipe == "row" else s_gmem.at[:, rows])
    plgpu.wait_smem_to_gmem(0)

  s_shape = (m,) if recipe == "row" else (kb, m)
  s_tile = (bm,) if recipe == "row" else (kb, bm)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct(s_shape, F32)),
      scratch_types=dict(x_smem=plgpu.SMEM((bm, k), x.dtype), q_smem=plgpu.SMEM((bm, k), dtype),
                         s_smem=plgpu.SMEM(s_tile, F32), barrier=plgpu.Barrier(num_barriers=1)),
      grid=(m // bm,),
      grid_names=("m",),
      interpret=plgpu.InterpretGPUParams() if interpret else False,
  )
  return call(x)


def fp8_quantize(x: jax.Array, *, recipe: str = "row", dtype=jnp.float8_e4m3fn,
                 config: TuningConfig = TuningConfig(), k_major_scales: bool = False,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x [M, K] bf16/f32 -> (q, scale) with q * scale ~= x.

  recipe "row": q [M, K], scale [M]. recipe "block": q [M, K'] (K' = K rounded up to 128, zero
  columns appended), scale [M, K'/128], or [K'/128, M] with `k_major_scales=True` (the kernel's
  own layout, no transpose op). Bit-identical to `fp8_quantize_reference`.
  """
  _check(x, recipe, dtype)
  if k_major_scales and recipe != "block":
    raise ValueError("k_major_scales applies to the block recipe only")
  m, k = x.shape
  r, _ = _row_group(x.dtype)
  kp = -(-k // BLOCK) * BLOCK
  mp = -(-m // r) * r
  bm = _block_m(mp, kp, x.dtype, config)
  mp = -(-mp // bm) * bm
  xp = x if (mp, kp) == (m, k) else jnp.pad(x, ((0, mp - m), (0, kp - k)))
  q, s = _quantize_call(xp, recipe, jnp.dtype(dtype), bm, config.unroll, interpret)
  if recipe == "row":
    return q[:m, :k], s[:m]  # no-op slices when nothing was padded
  q, s = q[:m], s[:, :m]
  return q, (s if k_major_scales else s.T)


def fp8_quantize_reference(x: jax.Array, *, recipe: str = "row",
                           dtype=jnp.float8_e4m3fn) -> tuple[jax.Array, jax.Array]:
  """Plain jnp, the definition of jaxrec.ops.fp8_scaling.quantize_lhs (upcast to f32, correctly
  rounded division): q as there, scale [M] (row) or [M, K'/128] (block)."""
  _check(x, recipe, dtype)
  fmax, inv_fmax = _fmax(dtype), _inv_fmax(dtype)

  def scale_of(amax):
    amax = amax.astype(F32)
    return jnp.where(amax > 0, jnp.maximum(amax * inv_fmax, SCALE_MIN), 1.0)

  def cast(v, s_full):  # s_full: the scales broadcast to v's shape
    # the barrier keeps XLA:CPU from rewriting v / broadcast(s) into v * broadcast(1 / s)
    return jnp.clip(v.astype(F32) / lax.optimization_barrier(s_full), -fmax, fmax).astype(dtype)

  if recipe == "row":
    s = scale_of(jnp.max(jnp.abs(x), axis=1))
    return cast(x, jnp.broadcast_to(s[:, None], x.shape)), s
  m, k = x.shape
  x = jnp.pad(x, ((0, 0), (0, (-k) % BLOCK)))
  s = scale_of(jnp.max(jnp.abs(x.reshape(m, -1, BLOCK)), axis=2))
  return cast(x, jnp.repeat(s, BLOCK, axis=1)), s


def hbm_bytes(m: int, k: int, recipe: str, in_dtype) -> int:
  """Bytes a quantization must move at least: read x, write q and the f32 scales."""
  kb = 1 if recipe == "row" else math.ceil(k / BLOCK)
  return m * k * jnp.dtype(in_dtype).itemsize + m * k + m * kb * 4

