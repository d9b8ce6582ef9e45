"""FP8 GEMM for Hopper (sm90) in Pallas Mosaic GPU, with row-wise or block-wise scales and a fused epilogue.

Two scaling recipes, one function each (the scale shapes differ, so the recipe is the function):

    fp8_gemm            row-wise:   y = (a @ b_nk^T) * a_scale[:, None] * b_scale[None, :]
                        a_scale [M] (per row of a), b_scale [N] (per output column); per-tensor
                        scaling passes constant vectors.
    fp8_gemm_blockwise  block-wise (DeepSeek-V3 / DeepGEMM): y = sum_kb (a_kb @ b_kb^T) * a_scale[:, kb, None]
                        * b_scale[n // 128, kb], with a_scale [M, ceil(K/128)] (1 x 128 blocks of a) and
                        b_scale [ceil(N/128), ceil(K/128)] (128 x 128 blocks of b_nk).

Then the shared epilogue, in f32 and in this order, before the cast to `out_dtype` (bf16 by default; f16, f32):

    + bias[None, :]                  optional, [N] f32
    norm="block"                     BlockNorm (jaxrec.layers.blocknorm): each contiguous block of
                                     min(256, N) output features is divided by sqrt(mean(y_blk^2) + 1e-6).
                                     Needs N % 256 == 0 or N < 256 (one block of N), else ValueError.
    activation                       None, "relu" or "hard_swish"

so GEMM -> scale -> bias -> BlockNorm -> HardSwish -> bf16 is one kernel. a [M, K] and b_nk [N, K] are
float8_e4m3fn or float8_e5m2 (mixable). The weight is stored (N, K), K-major, once: FP8 WGMMA cannot
transpose B in hardware, and XLA adds a transpose kernel per call when the weight is (K, N).

Scale layout of the block recipe and jaxrec.ops.fp8_scaling: `quantize_lhs(x, dtype, "block")` returns
(qa [M, K'], sa [M, K'/128]), which is exactly (a, a_scale) here. `quantize_rhs(w, dtype, "block")` on
the (K, N) weight returns (qb [K', N'], sb [K'/128, N'/128]); pass b_nk = qb.T and b_scale = sb.T
(store both transposed once, with the weight). Then
fp8_gemm_blockwise(qa, qb.T, sa, sb.T, out_dtype=f32)[:, :N] == scaled_matmul(x, w, recipe="block")
up to f32 summation order (tests/kernels/test_fp8_gemm_sm90.py checks this).

Kernel structure: one warpgroup per (tile_m x tile_n) output tile, a TMA pipeline over K (tile_k = 128,
also the scale block). Row-wise: WGMMA accumulates in one f32 register accumulator over the whole K loop,
scales are applied once in the epilogue. Block-wise: per K step, each 128-wide column chunk of the tile is
WGMMA'd into a fresh scratch accumulator, waited on, multiplied by a_scale[:, kb] (per row) and the
weight block scale (per 128-column chunk; the wrapper expands b_scale to one value per column so both
arrive as pipelined [tile] vectors), and added into f32 register carries ("promotion", as in DeepGEMM).
BlockNorm needs a whole 256-feature block in one program, so it runs with tile_n = 256.
Per call the block-wise wrapper also transposes a_scale to [K/128, M] (1/32 of the fp8 activation
bytes; a quantize kernel could write that layout directly) and expands b_scale to [K/128, N]
(constant per weight: precompute it for inference). Forward only: gradients go through
jaxrec.ops.fp8_dense.

Tiles (TuningConfig): (tile_m, tile_n, tile_k) in TILES. Defaults, chosen for a 255-register warpgroup
budget (f32 accumulators take tile_m * width / 128 registers per thread): row-wise 128x128; block-wise
64x128 (carry + scratch); any norm="block" 64x256 (block-wise: 128 carry + 64 scratch registers).
A tile whose accumulators reach 256 registers (block-wise 128x128: 128 carry + 128 scratch) raises
NotImplementedError.
None of these is measured on an H100 yet (the tests lower every path for sm90 on CPU, which runs
Mosaic GPU's layout inference, but not ptxas); warp specialisation, two consumer warpgroups and a
persistent grid are the next steps.

Awkward shapes: any M, N, K >= 1. The wrapper zero-pads M, N, K up to the tile (zeros change no sum;
padded scales are 1.0, padded bias 0) and slices the result, so the answer is exact, M = 1 included
(at the cost of a padded copy of unaligned operands each call: store weights pre-padded). The one shape
constraint is BlockNorm's block structure above, raised as a ValueError naming it. On CPU the kernel
runs through jax's Mosaic GPU interpreter (`interpret=True`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

FP8_TYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
OUT_TYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
ACTIVATIONS = {None: lambda y: y, "relu": lambda y: jnp.maximum(y, 0.0),
               "hard_swish": lambda y: y * jnp.minimum(jnp.maximum(y + 3.0, 0.0), 6.0) / 6.0}
NORMS = (None, "block")
SCALE_BLOCK = 128  # the block recipe's K and N block: jaxrec.ops.fp8_scaling.BLOCK
NORM_BLOCK = 256   # BlockNorm's feature block and eps: jaxrec.layers.blocknorm
NORM_EPS = 1e-6
TILES = ((128, 128, 128), (64, 128, 128), (64, 256, 128))
_CHUNK = 128  # column width of one block-wise WGMMA / promotion step


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if (self.tile_m, self.tile_n, self.tile_k) not in TILES:
      raise NotImplementedError(f"tiles (tile_m, tile_n, tile_k) must be one of {TILES} (the ones "
                                f"implemented and checked), got {self.tile_m}x{self.tile_n}x{self.tile_k}")
    if self.max_concurrent_steps < 2:
      # the row recipe's pipeline releases each stage one step late (delay_release=1), which
      # emit_pipeline refuses with a single stage
      raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")


def default_config(recipe: str, norm: str | None) -> TuningConfig:
  """The tile for a recipe ("row" / "block") and epilogue; see the module docstring."""
  if norm == "block":
    return TuningConfig(tile_m=64, tile_n=256)
  return TuningConfig(tile_m=128 if recipe == "row" else 64, tile_n=128)


def _cdiv(x: int, y: int) -> int:
  return -(-x // y)


def _round_up(x: int, y: int) -> int:
  return _cdiv(x, y) * y


def _pad_to(x: jax.Array, shape: tuple[int, ...], value: float = 0) -> jax.Array:
  widths = [(0, t - s) for s, t in zip(x.shape, shape)]
  return x if all(w == (0, 0) for w in widths) else jnp.pad(x, widths, constant_values=value)


def _norm_width(n: int) -> int:
  """BlockNorm's block for N output features, as jaxrec.layers.blocknorm defines it."""
  width = min(NORM_BLOCK, n)
  if n % width:
    raise ValueError(f"norm='block' normalizes blocks of {NORM_BLOCK} output features: N={n} must be a "
                     f"multiple of {NORM_BLOCK} (or below {NORM_BLOCK}, one block of N); padding N would "
                     "change the block means")
  return width


def _check_common(a, b_nk, bias, activation, norm, out_dtype) -> tuple[int, int, int]:
  if jnp.dtype(out_dtype) not in OUT_TYPES:
    # an fp8 output would need an output scale and a clip: the plain cast gives NaN past 448 (e4m3)
    raise NotImplementedError(f"out_dtype must be one of bfloat16, float16, float32, got {jnp.dtype(out_dtype)}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
  if a.ndim != 2 or b_nk.ndim != 2 or a.shape[1] != b_nk.shape[1]:
    raise ValueError(f"fp8_gemm needs a [M, K] and b_nk [N, K], got {a.shape} and {b_nk.shape}")
  if a.dtype not in FP8_TYPES or b_nk.dtype not in FP8_TYPES:
    raise ValueError(f"operands must be float8_e4m3fn or float8_e5m2, got {a.dtype} and {b_nk.dtype}")
  m, k = a.shape
  n = b_nk.shape[0]
  if min(m, n, k) < 1:
    raise ValueError(f"fp8_gemm needs M, N, K >= 1, got {m}, {n}, {k}")
  if bias is not None and bias.shape != (n,):
    raise ValueError(f"bias must be [{n}], got {bias.shape}")
  if norm == "block":
    _norm_width(n)
  return m, n, k


def _acc_registers(cfg: TuningConfig, recipe: str) -> int:
  """f32 accumulator registers per thread of the warpgroup: the tile's, plus the block recipe's
  128-wide scratch accumulator."""
  return cfg.tile_m * cfg.tile_n // 128 + (cfg.tile_m * _CHUNK // 128 if recipe == "block" else 0)


def _config(config: TuningConfig | None, recipe: str, norm: str | None) -> TuningConfig:
  cfg = default_config(recipe, norm) if config is None else config
  if _acc_registers(cfg, recipe) >= 256:
    raise NotImplementedError(f"{recipe}-wise recipe with {cfg.tile_m}x{cfg.tile_n} tiles: "
                              f"{_acc_registers(cfg, recipe)} f32 accumulator registers per thread, over "
                              "the 255-register budget (module docstring); use a 64-row tile")
  if norm == "block" and cfg.tile_n != NORM_BLOCK:
    raise ValueError(f"norm='block' needs tile_n={NORM_BLOCK} (a whole BlockNorm block per program), "
                     f"got tile_n={cfg.tile_n}")
  return cfg


def fp8_gemm(a: jax.Array, b_nk: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
             bias: jax.Array | None = None, activation: str | None = None, norm: str | None = None,
             out_dtype=jnp.bfloat16, config: TuningConfig | None = None,
             interpret: bool = False) -> jax.Array:
  """Row-wise recipe: act(norm((a @ b_nk.T) * a_scale[:, None] * b_scale[None, :] + bias)) -> [M, N].

  a [M, K] fp8, b_nk [N, K] fp8, a_scale [M] f32, b_scale [N] f32, bias [N] f32 or None.
  """
  m, n, k = _check_common(a, b_nk, bias, activation, norm, out_dtype)
  if a_scale.shape != (m,) or b_scale.shape != (n,):
    raise ValueError(f"a_scale must be [{m}] and b_scale [{n}], got {a_scale.shape} and {b_scale.shape}")
  cfg = _config(config, "row", norm)
  mp, np_, kp = _round_up(m, cfg.tile_m), _round_up(n, cfg.tile_n), _round_up(k, cfg.tile_k)
  y = _gemm(_pad_to(a, (mp, kp)), _pad_to(b_nk, (np_, kp)),
            _pad_to(a_scale.astype(jnp.float32), (mp,), 1.0),
            _pad_to(b_scale.astype(jnp.float32), (np_,), 1.0),
            None if bias is None else _pad_to(bias.astype(jnp.float32), (np_,)),
            recipe="row", activation=activation, norm_width=_norm_width(n) if norm else 0,
            out_dtype=out_dtype, cfg=cfg, interpret=interpret)
  return y[:m, :n]


def fp8_gemm_blockwise(a: jax.Array, b_nk: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
                       bias: jax.Array | None = None, activation: str | None = None,
                       norm: str | None = None, out_dtype=jnp.bfloat16,
                       config: TuningConfig | None = None, interpret: bool = False) -> jax.Array:
  """Block-wise recipe: act(norm(sum_kb (a_kb @ b_kb.T) * a_scale[:, kb] * b_scale[n/128, kb] + bias)).

  a [M, K] fp8, b_nk [N, K] fp8, a_scale [M, ceil(K/128)] f32 (1 x 128 blocks of a),
  b_scale [ceil(N/128), ceil(K/128)] f32 (128 x 128 blocks of b_nk), bias [N] f32 or None -> [M, N].
  """
  m, n, k = _check_common(a, b_nk, bias, activation, norm, out_dtype)
  kb, nb = _cdiv(k, SCALE_BLOCK), _cdiv(n, SCALE_BLOCK)
  if a_scale.shape != (m, kb) or b_scale.shape != (nb, kb):
    raise ValueError(f"block-wise scales: a_scale must be [M, ceil(K/128)] = [{m}, {kb}] and b_scale "
                     f"[ceil(N/128), ceil(K/128)] = [{nb}, {kb}], got {a_scale.shape} and {b_scale.shape}")
  cfg = _config(config, "block", norm)
  mp, np_, kp = _round_up(m, cfg.tile_m), _round_up(n, cfg.tile_n), kb * SCALE_BLOCK
  # kernel layout: per K block, one contiguous [Mp] / [Np] scale vector (the weight block scale
  # repeated over its 128 columns), flattened so each pipeline step reads one 1-D tile
  sa_t = _pad_to(a_scale.astype(jnp.float32), (mp, kb), 1.0).T.reshape(-1)
  sb_cols = jnp.repeat(b_scale.astype(jnp.float32), SCALE_BLOCK, axis=0)  # [nb * 128, kb]
  sb_t = _pad_to(sb_cols, (np_, kb), 1.0).T.reshape(-1)
  y = _gemm(_pad_to(a, (mp, kp)), _pad_to(b_nk, (np_, kp)), sa_t, sb_t,
            None if bias is None else _pad_to(bias.astype(jnp.float32), (np_,)),
            recipe="block", activation=activation, norm_width=_norm_width(n) if norm else 0,
            out_dtype=out_dtype, cfg=cfg, interpret=interpret)
  return y[:m, :n]


def _gemm(a, b_nk, sa, sb, bias, *, recipe: str, activation, norm_width: int, out_dtype,
          cfg: TuningConfig, interpret: bool) -> jax.Array:
  """The kernel on tile-aligned operands. Row: sa [Mp], sb [Np]. Block: sa, sb [KB * Mp], [KB * Np]."""
  m, k = a.shape
  n = b_nk.shape[0]
  act = ACTIVATIONS[activation]
  has_bias = bias is not None
  if bias is None:
    bias = jnp.zeros((n,), jnp.float32)  # not read by the kernel; keeps one signature
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  m_tiles, n_tiles, k_steps = m // tm, n // tn, k // tk
  # the row recipe keeps one accumulator as wide as the tile; the block recipe promotes 128-wide chunks
  cw = tn if recipe == "row" else _CHUNK
  nc = tn // cw
  # fp8 operands: 128-byte swizzle = 128 elements per row of a tile
  transforms = (plgpu.TilingTransform((8, tk)), plgpu.SwizzleTransform(128))
  row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

  def rows(v, shape):  # [tm] -> [tm, w], constant along each row
    return lax.broadcast_in_dim(v, shape, [0])

  def cols(v, shape):  # [w] -> [tm, w], constant down each column
    return lax.broadcast_in_dim(v, shape, [1])

  def body(a_gmem, b_gmem, sa_gmem, sb_gmem, bias_gmem, o_gmem, o_smem, sa_smem, sb_smem, bias_smem,
           barriers):
    pm, pn = lax.axis_index("m"), lax.axis_index("n")
    if has_bias:
      plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(pn * tn, tn)], bias_smem, barriers.at[2])
    a_spec = plgpu.BlockSpec((tm, tk), lambda kk: (pm, kk), transforms=transforms, delay_release=1)
    b_spec = plgpu.BlockSpec((tn, tk), lambda kk: (pn, kk), transforms=transforms, delay_release=1)

    if recipe == "row":
      plgpu.copy_gmem_to_smem(sa_gmem.at[pl.ds(pm * tm, tm)], sa_smem, barriers.at[0])
      plgpu.copy_gmem_to_smem(sb_gmem.at[pl.ds(pn * tn, tn)], sb_smem, barriers.at[1])

      def scoped(acc):
        def step(_, a_s, b_s):
          plgpu.wgmma(acc, a_s, b_s.T)
          plgpu.wgmma_wait(1)

        plgpu.emit_pipeline(step, grid=(k_steps,), max_concurrent_steps=cfg.max_concurrent_steps,
                            in_specs=[a_spec, b_spec])(a_gmem, b_gmem)
        plgpu.wgmma_wait(0)
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])
        sa = plgpu.load(sa_smem, layout=row_layout)
        sb = plgpu.load(sb_smem, layout=col_layout)
        return (acc[...] * rows(sa, (tm, tn)) * cols(sb, (tm, tn)),)

      chunks = pl.run_scoped(scoped, plgpu.ACC((tm, tn), jnp.float32))
    else:
      def step(_, a_s, b_s, sa_s, sb_s, carry):
        sa = rows(plgpu.load(sa_s, layout=row_layout), (tm, cw))
        out = []
        for c in range(nc):
          def part_of(acc, c=c):  # this K block's partial product for column chunk c, unscaled
            plgpu.wgmma(acc, a_s, b_s.at[pl.ds(c * cw, cw)].T)
            return acc[...]  # waits for the WGMMA

          part = pl.run_scoped(part_of, plgpu.ACC((tm, cw), jnp.float32))
          sb = cols(plgpu.load(sb_s.at[pl.ds(c * cw, cw)], layout=col_layout), (tm, cw))
          out.append(carry[c] + part * sa * sb)
        return tuple(out)

      zeros = tuple(plgpu.layout_cast(jnp.zeros((tm, cw), jnp.float32), plgpu.Layout.WGMMA)
                    for _ in range(nc))
      chunks = plgpu.emit_pipeline(
          step, grid=(k_steps,), max_concurrent_steps=cfg.max_concurrent_steps, init_carry=zeros,
          in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (pm, kk), transforms=transforms),
                    plgpu.BlockSpec((tn, tk), lambda kk: (pn, kk), transforms=transforms),
                    plgpu.BlockSpec((tm,), lambda kk: (kk * m_tiles + pm,)),
                    plgpu.BlockSpec((tn,), lambda kk: (kk * n_tiles + pn,))],
      )(a_gmem, b_gmem, sa_gmem, sb_gmem)

    # epilogue over the column chunks of the tile: bias, BlockNorm, activation, cast
    chunks = list(chunks)
    if has_bias:
      plgpu.barrier_wait(barriers.at[2])
      chunks = [y + cols(plgpu.load(bias_smem.at[pl.ds(c * cw, cw)], layout=col_layout), (tm, cw))
                for c, y in enumerate(chunks)]
    if norm_width:
      # tile_n == 256 holds exactly one block; when N < 256 the padded columns are exact zeros, so
      # summing all 256 and dividing by N is the mean over the N real features
      ssq = sum(jnp.sum(y * y, axis=1) for y in chunks)
      inv = lax.rsqrt(ssq / float(norm_width) + NORM_EPS)
      chunks = [y * rows(inv, (tm, cw)) for y in chunks]
    for c, y in enumerate(chunks):
      o_smem.at[c][...] = act(y).astype(out_dtype)
    plgpu.commit_smem()
    for c in range(nc):
      plgpu.copy_smem_to_gmem(o_smem.at[c], o_gmem.at[pl.ds(pm * tm, tm), pl.ds(pn * tn + c * cw, cw)])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      scratch_types=dict(o_smem=plgpu.SMEM((nc, tm, cw), out_dtype),
                         sa_smem=plgpu.SMEM((tm,), jnp.float32),
                         sb_smem=plgpu.SMEM((tn,), jnp.float32),
                         bias_smem=plgpu.SMEM((tn,), jnp.float32),
                         barriers=plgpu.Barrier(num_barriers=3)),
      grid=(m_tiles, n_tiles),
      grid_names=("m", "n"),
      interpret=plgpu.InterpretGPUParams() if interpret else False,
  )
  return kernel(a, b_nk, sa, sb, bias)


def epilogue_reference(y: jax.Array, *, bias: jax.Array | None = None, norm: str | None = None,
                       activation: str | None = None) -> jax.Array:
  """The kernels' epilogue in plain jnp on scaled f32 products y [M, N] (f32 out)."""
  y = y.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  if norm == "block":
    m, n = y.shape
    w = _norm_width(n)
    yb = y.reshape(m, n // w, w)
    y = (yb * lax.rsqrt(jnp.mean(yb * yb, axis=-1, keepdims=True) + NORM_EPS)).reshape(m, n)
  elif norm is not None:
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
  return ACTIVATIONS[activation](y)


def fp8_gemm_reference(a: jax.Array, b_nk: jax.Array, a_scale: jax.Array, b_scale: jax.Array, *,
                       bias: jax.Array | None = None, activation: str | None = None,
                       norm: str | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
  """Plain jnp: the row-wise computation, upcast to f32."""
  y = jnp.dot(a.astype(jnp.float32), b_nk.astype(jnp.float32).T, precision="highest")
  y = y * a_scale.astype(jnp.float32)[:, None] * b_scale.astype(jnp.float32)[None, :]
  return epilogue_reference(y, bias=bias, norm=norm, activation=activation).astype(out_dtype)


def fp8_gemm_blockwise_reference(a: jax.Array, b_nk: jax.Array, a_scale: jax.Array, b_scale: jax.Array,
                                 *, bias: jax.Array | None = None, activation: str | None = None,
                                 norm: str | None = None, out_dtype=jnp.bfloat16) -> jax.Array:
  """Plain jnp: the block-wise computation, upcast to f32 (each K block multiplied and scaled, then summed)."""
  m, k = a.shape
  n = b_nk.shape[0]
  kb = _cdiv(k, SCALE_BLOCK)
  a32 = _pad_to(a.astype(jnp.float32), (m, kb * SCALE_BLOCK)).reshape(m, kb, SCALE_BLOCK)
  b32 = _pad_to(b_nk.astype(jnp.float32), (n, kb * SCALE_BLOCK)).reshape(n, kb, SCALE_BLOCK)
  parts = jnp.einsum("mkc,nkc->mkn", a32, b32, precision="highest")  # [M, KB, N]
  sb_cols = jnp.repeat(b_scale.astype(jnp.float32), SCALE_BLOCK, axis=0)[:n]  # [N, KB]
  y = jnp.sum(parts * a_scale.astype(jnp.float32)[:, :, None] * sb_cols.T[None], axis=1)
  return epilogue_reference(y, bias=bias, norm=norm, activation=activation).astype(out_dtype)
