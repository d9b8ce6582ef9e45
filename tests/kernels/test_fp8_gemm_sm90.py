"""fp8_gemm_sm90 against its jnp references, through jax's Mosaic GPU interpreter on CPU.

The kernel and the reference see the same FP8 operands and both accumulate in f32. Each differs from
the exact sum by at most gamma_n * sum|a b| (Higham's bound, gamma_n = n u / (1 - n u), u = 2^-24,
n = K plus a few roundings for the scales), so they differ from each other by at most twice that;
with bf16 output each element may differ by one bf16 rounding (2^-8 relative) on top. BlockNorm and
the activation propagate that bound (see `norm_tol`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.layers.blocknorm import block_norm
from jaxrec.ops.fp8_scaling import quantize_lhs, quantize_rhs, scaled_matmul
from kernels_pallas.fp8_gemm_sm90 import (TuningConfig, epilogue_reference, fp8_gemm, fp8_gemm_blockwise,
                                          fp8_gemm_blockwise_reference, fp8_gemm_reference)

U = 2.0 ** -24  # f32 unit roundoff

on_gpu = any(d.platform == "gpu" for d in jax.devices())


def operands(m, n, k, seed, b_dtype=jnp.float8_e4m3fn):
  """Row-wise quantized operands of realistic data with outlier columns (as the recipe makes them)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k))
  x[:, rng.choice(k, 2, replace=False)] *= 50.0
  w_t = rng.normal(size=(n, k))  # weight stored (N, K)
  qa, sa = quantize_lhs(jnp.asarray(x, jnp.float32), jnp.float8_e4m3fn, "row")
  qb, sb = quantize_lhs(jnp.asarray(w_t, jnp.float32), b_dtype, "row")
  return qa, qb, sa[:, 0], sb[:, 0]


def gamma(n):
  return n * U / (1 - n * U)


def row_mag(a, b, sa, sb):
  """sum_k |a b| * sa * sb in f64: the scale of the f32 summation error of the row-wise GEMM."""
  return ((np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64)).T)
          * np.asarray(sa, np.float64)[:, None] * np.asarray(sb, np.float64)[None, :])


def check(y, a, b, sa, sb, out_dtype):
  ref = np.asarray(fp8_gemm_reference(a, b, sa, sb, out_dtype=jnp.float32), np.float64)
  return within(y, ref, 2 * gamma(a.shape[1] + 2) * row_mag(a, b, sa, sb), out_dtype)


def within(y, ref, tol, out_dtype):
  """Elementwise |y - ref| <= tol (+ one bf16 rounding of ref for bf16 output)."""
  if out_dtype == jnp.bfloat16:
    tol = tol + 2.0 ** -8 * np.abs(ref)
  return bool(np.all(np.abs(np.asarray(y, np.float64) - ref) <= tol + 1e-30))


@pytest.mark.parametrize("m,n,k", [(128, 128, 128), (256, 384, 256), (128, 256, 512)])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(m, n, k, out_dtype):
  a, b, sa, sb = operands(m, n, k, seed=m + n + k)
  y = fp8_gemm(a, b, sa, sb, out_dtype=out_dtype, interpret=not on_gpu)
  assert y.shape == (m, n) and y.dtype == out_dtype
  assert check(y, a, b, sa, sb, out_dtype)


def test_mixed_e4m3_e5m2_operands():
  a, b, sa, sb = operands(128, 128, 256, seed=3, b_dtype=jnp.float8_e5m2)
  y = fp8_gemm(a, b, sa, sb, out_dtype=jnp.float32, interpret=not on_gpu)
  assert check(y, a, b, sa, sb, jnp.float32)


def test_negative_control_wrong_scales_fail():
  a, b, sa, sb = operands(128, 128, 128, seed=4)
  y = fp8_gemm(a, b, sa, sb[::-1], out_dtype=jnp.float32, interpret=not on_gpu)
  assert not check(y, a, b, sa, sb, jnp.float32)


@pytest.mark.parametrize("m,n,k", [(1, 128, 128), (200, 136, 200), (100, 1, 128)])
def test_awkward_shapes_are_padded_exactly(m, n, k):
  a, b, sa, sb = operands(m, n, k, seed=m + 2 * n + 3 * k)
  y = fp8_gemm(a, b, sa, sb, out_dtype=jnp.float32, interpret=not on_gpu)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  assert check(y, a, b, sa, sb, jnp.float32)


def test_bad_inputs_are_clear():
  a = jnp.zeros((128, 128), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="float8"):
    fp8_gemm(a.astype(jnp.bfloat16), a, jnp.ones(128), jnp.ones(128), interpret=True)
  with pytest.raises(ValueError, match="a_scale must be"):
    fp8_gemm(a, a, jnp.ones(64), jnp.ones(128), interpret=True)
  with pytest.raises(NotImplementedError, match="must be one of"):
    TuningConfig(tile_n=256)  # 128 x 256: an f32 accumulator of 256 registers per thread
  with pytest.raises(NotImplementedError, match="256 f32 accumulator registers"):
    # block-wise 128 x 128: 128 carry + 128 scratch registers per thread, as over budget as the above
    fp8_gemm_blockwise(a, a, jnp.ones((128, 1)), jnp.ones((1, 1)), config=TuningConfig(), interpret=True)
  with pytest.raises(ValueError, match="max_concurrent_steps must be >= 2"):
    TuningConfig(max_concurrent_steps=1)  # emit_pipeline refuses it for the row recipe (delay_release=1)
  with pytest.raises(ValueError, match="M, N, K >= 1"):
    fp8_gemm(a[:0], a, jnp.ones(0), jnp.ones(128), interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA Hopper GPU (compiled Mosaic GPU kernel)")
def test_compiled_on_gpu_matches_reference():
  a, b, sa, sb = operands(1024, 1024, 1024, seed=5)
  y = jax.jit(lambda *args: fp8_gemm(*args, out_dtype=jnp.bfloat16))(a, b, sa, sb)
  assert check(y, a, b, sa, sb, jnp.bfloat16)


@pytest.mark.parametrize("activation", [None, "relu", "hard_swish"])
def test_fused_bias_and_activation(activation):
  a, b, sa, sb = operands(128, 256, 256, seed=6)
  bias = jnp.asarray(np.random.default_rng(7).normal(size=256) * 5, jnp.float32)
  y = np.asarray(fp8_gemm(a, b, sa, sb, bias=bias, activation=activation, out_dtype=jnp.float32,
                          interpret=not on_gpu), np.float64)
  ref = np.asarray(fp8_gemm_reference(a, b, sa, sb, bias=bias, activation=activation, out_dtype=jnp.float32),
                   np.float64)
  mag = (np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64)).T
         * np.asarray(sa)[:, None] * np.asarray(sb)[None, :]) + np.abs(np.asarray(bias))[None, :]
  # activations here are at most 1.5-Lipschitz; f32 summation-order error as in `check`
  assert np.all(np.abs(y - ref) <= 1.5 * (258 * 2.0 ** -24) * mag + 1e-30)
  if activation == "relu":
    assert y.min() == 0.0 and (y == 0).mean() > 0.2  # the activation really ran
  wrong = np.asarray(fp8_gemm(a, b, sa, sb, bias=-bias, activation=activation, out_dtype=jnp.float32,
                              interpret=not on_gpu), np.float64)
  assert not np.allclose(wrong, ref)  # negative control: the bias really matters


def test_bad_epilogue_arguments():
  a = jnp.zeros((128, 128), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="activation must be one of"):
    fp8_gemm(a, a, jnp.ones(128), jnp.ones(128), activation="gelu", interpret=True)
  with pytest.raises(ValueError, match="bias must be"):
    fp8_gemm(a, a, jnp.ones(128), jnp.ones(128), bias=jnp.ones(64), interpret=True)
  for kern, sa, sb in ((fp8_gemm, jnp.ones(128), jnp.ones(128)),
                       (fp8_gemm_blockwise, jnp.ones((128, 1)), jnp.ones((1, 1)))):
    with pytest.raises(NotImplementedError, match="out_dtype must be one of"):
      # the plain cast to e4m3 made NaN of every output past 448 (no output scale, no clip)
      kern(a, a, sa, sb, out_dtype=jnp.float8_e4m3fn, interpret=True)


# ---- block-wise recipe (1 x 128 activation blocks, 128 x 128 weight blocks) -------------------------


def block_operands(m, n, k, seed):
  """Operands quantized by jaxrec.ops.fp8_scaling's "block" recipe, in the kernel's layout.

  x [M, K] has outlier columns and w [K, N] one 128 x 128 block scaled up 30x, so the block scales
  really differ along K and N. Returns (x, w) and (a [M, K], b_nk [N, K], a_scale [M, KB],
  b_scale [NB, KB]): quantize_rhs's [K', N'] weight and [KB, NB] scales, transposed once.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k))
  x[:, rng.choice(k, min(k, 2), replace=False)] *= 50.0
  w = rng.normal(size=(k, n)) / np.sqrt(k)
  w[:128, :128] *= 30.0
  x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  qa, sa = quantize_lhs(x, jnp.float8_e4m3fn, "block")  # [M, K'], [M, KB]
  qb, sb = quantize_rhs(w, jnp.float8_e4m3fn, "block")  # [K', N'], [KB, NB]
  # the K (and N) padding of the recipe is zeros; hand the kernel the unpadded operands
  return (x, w), (qa[:, :k], qb.T[:n, :k], sa, sb.T)


def block_mag(a, b, sa, sb):
  """sum_kb (|a_kb| @ |b_kb|^T) * sa[:, kb] * sb[n/128, kb] in f64 (scale of the f32 summation error)."""
  m, k = a.shape
  n = b.shape[0]
  a64, b64 = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
  sb_cols = np.repeat(np.asarray(sb, np.float64), 128, axis=0)[:n]  # [N, KB]
  mag = np.zeros((m, n))
  for kb in range(sb_cols.shape[1]):
    blk = slice(kb * 128, min(k, (kb + 1) * 128))
    mag += (a64[:, blk] @ b64[:, blk].T) * np.asarray(sa, np.float64)[:, kb, None] * sb_cols[None, :, kb]
  return mag


def block_check(y, a, b, sa, sb, out_dtype):
  ref = np.asarray(fp8_gemm_blockwise_reference(a, b, sa, sb, out_dtype=jnp.float32), np.float64)
  # per K block: a 128-term f32 dot, two scale products, one add into the running sum
  return within(y, ref, 2 * gamma(a.shape[1] + 3 * sb.shape[1] + 2) * block_mag(a, b, sa, sb), out_dtype)


@pytest.mark.parametrize("m,n,k,out_dtype", [(128, 128, 256, jnp.float32), (1, 136, 200, jnp.bfloat16),
                                             (200, 256, 384, jnp.float32), (64, 384, 128, jnp.bfloat16)])
def test_blockwise_matches_reference(m, n, k, out_dtype):
  _, (a, b, sa, sb) = block_operands(m, n, k, seed=m + n + k)
  y = fp8_gemm_blockwise(a, b, sa, sb, out_dtype=out_dtype, interpret=not on_gpu)
  assert y.shape == (m, n) and y.dtype == out_dtype
  assert block_check(y, a, b, sa, sb, out_dtype)


def test_blockwise_agrees_with_scaled_matmul_block_recipe():
  # the scale layout contract with jaxrec.ops.fp8_scaling: same quantized operands, same answer
  (x, w), (a, b, sa, sb) = block_operands(72, 136, 200, seed=11)
  y = fp8_gemm_blockwise(a, b, sa, sb, out_dtype=jnp.float32, interpret=not on_gpu)
  ref = np.asarray(scaled_matmul(x, w, recipe="block", out_dtype=jnp.float32), np.float64)
  assert within(y, ref, 2 * gamma(200 + 3 * 2 + 2) * block_mag(a, b, sa, sb), jnp.float32)
  # and the recipe does its job: per-row relative error against the unquantized f32 product within
  # what e4m3's 3 mantissa bits allow (2^-4 relative per operand, so ~2^-3 per product term)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  row_err = np.linalg.norm(np.asarray(y, np.float64) - exact, axis=1) / np.linalg.norm(exact, axis=1)
  assert np.all(row_err <= 2.0 ** -3)


def test_blockwise_negative_control_transposed_block_scales_fail():
  _, (a, b, sa, sb) = block_operands(64, 256, 256, seed=12)  # b_scale [2, 2]: transposing keeps the shape
  y = fp8_gemm_blockwise(a, b, sa, sb.T, out_dtype=jnp.float32, interpret=not on_gpu)
  assert not block_check(y, a, b, sa, sb, jnp.float32)


def test_blockwise_bad_scales_are_clear():
  a = jnp.zeros((64, 200), jnp.float8_e4m3fn)
  b = jnp.zeros((136, 200), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match=r"a_scale must be \[M, ceil\(K/128\)\] = \[64, 2\]"):
    fp8_gemm_blockwise(a, b, jnp.ones((64, 1)), jnp.ones((2, 2)), interpret=True)
  with pytest.raises(ValueError, match=r"\[ceil\(N/128\), ceil\(K/128\)\] = \[2, 2\]"):
    fp8_gemm_blockwise(a, b, jnp.ones((64, 2)), jnp.ones((136, 2)), interpret=True)


# ---- BlockNorm epilogue: GEMM -> scale -> bias -> BlockNorm -> HardSwish in one kernel ---------------


def norm_tol(z, t, width):
  """Bound on |norm(z + d) - norm(z)| (+ the f32 roundings of both sides) for |d| <= t elementwise.

  norm(z)_i = z_i / r, r = sqrt(mean_blk(z^2) + eps): |dn_i| <= t_i / r + |z_i| dr / r^2 with
  dr <= sqrt(mean_blk(t^2)) (triangle inequality). Computing r in f32 costs gamma_(width + 4)
  relative in each of kernel and reference; the activation here is at most 1.5-Lipschitz and its
  own f32 evaluation a few roundings of |n|.
  """
  m, n = z.shape
  zb, tb = z.reshape(m, n // width, width), t.reshape(m, n // width, width)
  r = np.sqrt(np.mean(zb * zb, axis=-1, keepdims=True) + 1e-6)
  dr = np.sqrt(np.mean(tb * tb, axis=-1, keepdims=True))
  nrm = np.abs(zb) / r
  dn = tb / r + nrm * dr / r + 2 * gamma(width + 4) * nrm
  return (1.5 * dn + 8 * U * nrm).reshape(m, n)


@pytest.mark.parametrize("recipe,m,n,k,out_dtype", [("row", 200, 512, 256, jnp.bfloat16),
                                                    ("row", 1, 136, 128, jnp.float32),
                                                    ("block", 72, 256, 200, jnp.float32),
                                                    ("block", 1, 128, 128, jnp.bfloat16)])
def test_fused_blocknorm_hard_swish_matches_reference(recipe, m, n, k, out_dtype):
  bias = jnp.asarray(np.random.default_rng(n).normal(size=n) * 3, jnp.float32)
  if recipe == "row":
    a, b, sa, sb = operands(m, n, k, seed=m + n)
    kern, ref_fn = fp8_gemm, fp8_gemm_reference
    mag, t_gemm = row_mag(a, b, sa, sb), 2 * gamma(k + 2)
  else:
    _, (a, b, sa, sb) = block_operands(m, n, k, seed=m + n)
    kern, ref_fn = fp8_gemm_blockwise, fp8_gemm_blockwise_reference
    mag, t_gemm = block_mag(a, b, sa, sb), 2 * gamma(k + 3 * sb.shape[1] + 2)
  y = kern(a, b, sa, sb, bias=bias, norm="block", activation="hard_swish", out_dtype=out_dtype,
           interpret=not on_gpu)
  assert y.shape == (m, n) and y.dtype == out_dtype
  ref = np.asarray(ref_fn(a, b, sa, sb, bias=bias, norm="block", activation="hard_swish",
                          out_dtype=jnp.float32), np.float64)
  z = np.asarray(ref_fn(a, b, sa, sb, bias=bias, out_dtype=jnp.float32), np.float64)  # pre-norm
  # the bias add is one more f32 rounding of |z|
  tol = norm_tol(z, t_gemm * mag + 2 * U * np.abs(z), min(256, n))
  assert within(y, ref, tol, out_dtype)
  # negative control: the same kernel without the norm is far from the fused reference
  plain = kern(a, b, sa, sb, bias=bias, activation="hard_swish", out_dtype=out_dtype, interpret=not on_gpu)
  assert not within(plain, ref, tol, out_dtype)


def test_fused_blocknorm_eps_on_rows_near_zero():
  """Rows whose mean square falls to BlockNorm's eps (1e-6) and below, where eps decides the output
  (on the rows above, of mean square ~1e4, no eps would be visible)."""
  a, b, sa, sb = operands(8, 256, 128, seed=15)
  sa = sa * jnp.asarray(10.0 ** -np.linspace(0, 7, 8), jnp.float32)  # row mean squares ~1e4 ... 1e-10
  y = fp8_gemm(a, b, sa, sb, norm="block", out_dtype=jnp.float32, interpret=not on_gpu)
  ref = np.asarray(fp8_gemm_reference(a, b, sa, sb, norm="block", out_dtype=jnp.float32), np.float64)
  z = np.asarray(fp8_gemm_reference(a, b, sa, sb, out_dtype=jnp.float32), np.float64)
  tol = norm_tol(z, 2 * gamma(128 + 2) * row_mag(a, b, sa, sb), 256) / 1.5  # no activation
  assert within(y, ref, tol, jnp.float32)
  # negative control: the same norm with eps 1e-5 differs on the small rows
  other = z / np.sqrt(np.mean(z * z, axis=1, keepdims=True) + 1e-5)
  assert not within(y, other, tol, jnp.float32)


@pytest.mark.parametrize("recipe", ["row", "block"])
def test_fused_blocknorm_below_256_features_ignores_the_padded_bias(recipe):
  """N < 256: the wrapper pads N to the 256-wide tile and BlockNorm sums all 256 columns, so the
  padded columns must be exact zeros, bias included (padded with 0, not 1 like the scales). Small
  products next to an O(1) bias, so that a non-zero padded bias would move the mean square; the
  other BlockNorm tests' products are too large for it to show (block recipe)."""
  m, n, k = 8, 136, 200
  if recipe == "row":
    a, b, sa, sb = operands(m, n, k, seed=21)
    kern, ref_fn, mag_fn, t_gemm = fp8_gemm, fp8_gemm_reference, row_mag, 2 * gamma(k + 2)
  else:
    _, (a, b, sa, sb) = block_operands(m, n, k, seed=21)
    kern, ref_fn, mag_fn = fp8_gemm_blockwise, fp8_gemm_blockwise_reference, block_mag
    t_gemm = 2 * gamma(k + 3 * sb.shape[1] + 2)
  sa = sa * 1e-3  # small products
  bias = jnp.asarray(np.random.default_rng(22).normal(size=n), jnp.float32)
  y = kern(a, b, sa, sb, bias=bias, norm="block", out_dtype=jnp.float32, interpret=not on_gpu)
  ref = np.asarray(ref_fn(a, b, sa, sb, bias=bias, norm="block", out_dtype=jnp.float32), np.float64)
  z = np.asarray(ref_fn(a, b, sa, sb, bias=bias, out_dtype=jnp.float32), np.float64)  # pre-norm
  tol = norm_tol(z, t_gemm * mag_fn(a, b, sa, sb) + 2 * U * np.abs(z), n) / 1.5  # no activation
  assert within(y, ref, tol, jnp.float32)
  # negative control: 256 - N padded columns of bias 1.0 in the block's sum of squares
  padded_one = z / np.sqrt((np.sum(z * z, axis=1, keepdims=True) + (256 - n)) / n + 1e-6)
  assert not within(y, padded_one, tol, jnp.float32)


@pytest.mark.parametrize("n", [512, 136])
def test_blocknorm_reference_is_the_layer(n):
  # the epilogue the kernels fuse is jaxrec.layers.blocknorm.block_norm (block min(256, N), eps 1e-6)
  # followed by jax.nn.hard_swish, as jaxrec.layers.mlp applies them
  y = jnp.asarray(np.random.default_rng(n).normal(size=(8, n)) * 5, jnp.float32)
  ours = epilogue_reference(y, norm="block", activation="hard_swish")
  layer = jax.nn.hard_swish(block_norm(y))
  np.testing.assert_allclose(np.asarray(ours), np.asarray(layer), rtol=4 * U, atol=4 * U)


def test_blocknorm_needs_whole_blocks():
  a = jnp.zeros((64, 128), jnp.float8_e4m3fn)
  b = jnp.zeros((384, 128), jnp.float8_e4m3fn)
  for kern, sa, sb in ((fp8_gemm, jnp.ones(64), jnp.ones(384)),
                       (fp8_gemm_blockwise, jnp.ones((64, 1)), jnp.ones((3, 1)))):
    with pytest.raises(ValueError, match="N=384 must be a multiple of 256"):
      kern(a, b, sa, sb, norm="block", interpret=True)
  with pytest.raises(ValueError, match="norm='block' needs tile_n=256"):
    fp8_gemm(a, b[:256], jnp.ones(64), jnp.ones(256), norm="block", config=TuningConfig(), interpret=True)
  with pytest.raises(ValueError, match="norm must be one of"):
    fp8_gemm(a, b[:256], jnp.ones(64), jnp.ones(256), norm="layer", interpret=True)


F8, F32 = jnp.float8_e4m3fn, jnp.float32
LOWER_CASES = {  # awkward M, N, K on purpose: the wrapper's padding is part of what gets lowered
    "row": (fp8_gemm, dict(), (200, 136, 200), lambda m, n, k: ((m,), (n,))),
    "row_norm_hard_swish": (fp8_gemm, dict(norm="block", activation="hard_swish"), (200, 512, 200),
                            lambda m, n, k: ((m,), (n,))),
    "block": (fp8_gemm_blockwise, dict(), (200, 136, 200), lambda m, n, k: ((m, 2), (2, 2))),
    "block_norm_hard_swish": (fp8_gemm_blockwise, dict(norm="block", activation="hard_swish"),
                              (200, 512, 200), lambda m, n, k: ((m, 2), (4, 2))),
}


@pytest.mark.parametrize("case", list(LOWER_CASES))
def test_lowers_for_sm90_without_a_gpu(case):
  # Lowering for "cuda" runs Mosaic GPU's layout inference and dialect lowering for sm90 on any host,
  # which checks what the interpreter does not (register layouts, WGMMA/TMA operand shapes and
  # transforms). Not checked here: ptxas, register pressure, speed (GPU-marked tests and the bench).
  kern, kwargs, (m, n, k), scale_shapes = LOWER_CASES[case]
  sa_shape, sb_shape = scale_shapes(m, n, k)
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in
          (((m, k), F8), ((n, k), F8), (sa_shape, F32), (sb_shape, F32), ((n,), F32))]
  fn = jax.jit(lambda a, b, sa, sb, bias: kern(a, b, sa, sb, bias=bias, **kwargs))
  text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA Hopper GPU (compiled Mosaic GPU kernel)")
def test_compiled_on_gpu_blockwise_and_fused_layer_match_reference():
  _, (a, b, sa, sb) = block_operands(1000, 1024, 1000, seed=13)
  y = jax.jit(lambda *args: fp8_gemm_blockwise(*args, out_dtype=jnp.bfloat16))(a, b, sa, sb)
  assert block_check(y, a, b, sa, sb, jnp.bfloat16)
  bias = jnp.asarray(np.random.default_rng(14).normal(size=1024), jnp.float32)
  y = jax.jit(lambda *args: fp8_gemm_blockwise(*args, bias=bias, norm="block", activation="hard_swish"))(
      a, b, sa, sb)
  ref = np.asarray(fp8_gemm_blockwise_reference(a, b, sa, sb, bias=bias, norm="block", activation="hard_swish",
                                                out_dtype=jnp.float32), np.float64)
  z = np.asarray(fp8_gemm_blockwise_reference(a, b, sa, sb, bias=bias, out_dtype=jnp.float32), np.float64)
  t_gemm = 2 * gamma(1000 + 3 * sb.shape[1] + 2) * block_mag(a, b, sa, sb)
  assert within(y, ref, norm_tol(z, t_gemm + 2 * U * np.abs(z), 256), jnp.bfloat16)
