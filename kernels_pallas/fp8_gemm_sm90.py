"""FP8 GEMM for Hopper (sm90) in Pallas Mosaic GPU, with a row/column scale epilogue.

    y [M, N] = act((a [M, K] @ b_nk [N, K]^T) * a_scale[:, None] * b_scale[None, :] + bias[None, :])

f32 accumulation in WGMMA registers, output cast to `out_dtype` (bf16 by default). The weight is
stored (N, K), K-major, once (FP8 WGMMA cannot transpose B in hardware; XLA adds a transpose
kernel per call when the weight is (K, N)). a_scale [M] and b_scale [N] are f32: per-row and
per-output-column scales (the row-wise recipe); per-tensor scaling passes constant vectors.
The epilogue optionally adds a bias [N] (f32) and applies an activation ("relu", "hard_swish")
before the cast, so GEMM -> bias -> activation is one kernel.

This is the first, plain version: one warpgroup per 128 x 128 output tile, a multi-stage TMA
pipeline over K, no warp specialisation or persistent grid yet. M, N and K must be multiples of
the tile sizes; other shapes raise NotImplementedError naming the constraint (pad them, or use
the XLA path). On CPU it runs through jax's Mosaic GPU interpreter (`interpret=True`).
Not yet measured on an H100.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

FP8_TYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
ACTIVATIONS = {None: lambda y: y, "relu": lambda y: jnp.maximum(y, 0.0),
               "hard_swish": lambda y: y * jnp.minimum(jnp.maximum(y + 3.0, 0.0), 6.0) / 6.0}


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if (self.tile_m, self.tile_n, self.tile_k) != (128, 128, 128):
      raise NotImplementedError(f"only 128x128x128 tiles are implemented and checked, got "
                                f"{self.tile_m}x{self.tile_n}x{self.tile_k}")
    if self.max_concurrent_steps < 1:
      raise ValueError("max_concurrent_steps must be >= 1")


def _check(a, b_nk, a_scale, b_scale, bias, activation, cfg: TuningConfig) -> tuple[int, int, int]:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
  if a.ndim != 2 or b_nk.ndim != 2 or a.shape[1] != b_nk.shape[1]:
    raise ValueError(f"fp8_gemm needs a [M, K] and b_nk [N, K], got {a.shape} and {b_nk.shape}")
  if a.dtype not in FP8_TYPES or b_nk.dtype not in FP8_TYPES:
    raise ValueError(f"operands must be float8_e4m3fn or float8_e5m2, got {a.dtype} and {b_nk.dtype}")
  m, k = a.shape
  n = b_nk.shape[0]
  if a_scale.shape != (m,) or b_scale.shape != (n,):
    raise ValueError(f"a_scale must be [{m}] and b_scale [{n}], got {a_scale.shape} and {b_scale.shape}")
  if bias is not None and bias.shape != (n,):
    raise ValueError(f"bias must be [{n}], got {bias.shape}")
  for name, size, tile in (("M", m, cfg.tile_m), ("N", n, cfg.tile_n), ("K", k, cfg.tile_k)):
    if size % tile:
      raise NotImplementedError(f"fp8_gemm: {name}={size} is not a multiple of the tile ({tile}); "
                                "pad the operands or use the XLA path (jaxrec.ops.fp8_dense impl='xla')")
  return m, n, k


def fp8_gemm(a: jax.Array, b_nk: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
             bias: jax.Array | None = None, activation: str | None = None,
             out_dtype=jnp.bfloat16, config: TuningConfig = TuningConfig(),
             interpret: bool = False) -> jax.Array:
  """act((a @ b_nk.T) * a_scale[:, None] * b_scale[None, :] + bias) -> [M, N] `out_dtype`."""
  m, n, k = _check(a, b_nk, a_scale, b_scale, bias, activation, config)
  act = ACTIVATIONS[activation]
  has_bias = bias is not None
  if bias is None:
    bias = jnp.zeros((n,), jnp.float32)  # not read by the kernel; keeps one signature
  tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
  # fp8 operands: 128-byte swizzle = 128 elements per row of a tile
  transforms = (plgpu.TilingTransform((8, tk)), plgpu.SwizzleTransform(128))

  def body(a_gmem, b_gmem, sa_gmem, sb_gmem, bias_gmem, o_gmem, o_smem, sa_smem, sb_smem, bias_smem,
           barriers):
    pm, pn = lax.axis_index("m"), lax.axis_index("n")
    plgpu.copy_gmem_to_smem(sa_gmem.at[pl.ds(pm * tm, tm)], sa_smem, barriers.at[0])
    plgpu.copy_gmem_to_smem(sb_gmem.at[pl.ds(pn * tn, tn)], sb_smem, barriers.at[1])
    if has_bias:
      plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(pn * tn, tn)], bias_smem, barriers.at[2])

    def scoped(acc):
      def step(_, a_s, b_s):
        plgpu.wgmma(acc, a_s, b_s.T)
        plgpu.wgmma_wait(1)

      plgpu.emit_pipeline(
          step, grid=(k // tk,), max_concurrent_steps=config.max_concurrent_steps,
          in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (pm, kk), transforms=transforms, delay_release=1),
                    plgpu.BlockSpec((tn, tk), lambda kk: (pn, kk), transforms=transforms, delay_release=1)],
      )(a_gmem, b_gmem)
      plgpu.wgmma_wait(0)
      plgpu.barrier_wait(barriers.at[0])
      plgpu.barrier_wait(barriers.at[1])
      sa = plgpu.load(sa_smem, layout=plgpu.Layout.WGMMA.reduce(1))
      sb = plgpu.load(sb_smem, layout=plgpu.Layout.WGMMA.reduce(0))
      y = acc[...] * lax.broadcast_in_dim(sa, (tm, tn), [0]) * lax.broadcast_in_dim(sb, (tm, tn), [1])
      if has_bias:
        plgpu.barrier_wait(barriers.at[2])
        y = y + lax.broadcast_in_dim(plgpu.load(bias_smem, layout=plgpu.Layout.WGMMA.reduce(0)), (tm, tn), [1])
      o_smem[...] = act(y).astype(out_dtype)

    pl.run_scoped(scoped, plgpu.ACC((tm, tn), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(pm * tm, tm), pl.ds(pn * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_types=dict(o_smem=plgpu.SMEM((tm, tn), out_dtype),
                         sa_smem=plgpu.SMEM((tm,), jnp.float32),
                         sb_smem=plgpu.SMEM((tn,), jnp.float32),
                         bias_smem=plgpu.SMEM((tn,), jnp.float32),
                         barriers=plgpu.Barrier(num_barriers=3)),
      grid=(m // tm, n // tn),
      grid_names=("m", "n"),
      interpret=plgpu.InterpretGPUParams() if interpret else False,
  )
  return kernel(a, b_nk, a_scale.astype(jnp.float32), b_scale.astype(jnp.float32), bias.astype(jnp.float32))


def fp8_gemm_reference(a: jax.Array, b_nk: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
                       bias: jax.Array | None = None, activation: str | None = None,
                       out_dtype=jnp.bfloat16) -> jax.Array:
  """Plain jnp: the same computation, upcast to f32."""
  y = jnp.dot(a.astype(jnp.float32), b_nk.astype(jnp.float32).T, precision="highest")
  y = y * a_scale.astype(jnp.float32)[:, None] * b_scale.astype(jnp.float32)[None, :]
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return ACTIVATIONS[activation](y).astype(out_dtype)
