"""fp8_dense (XLA path) against f32 with an error bound derived from the FP8 formats.

For y = a @ b computed from FP8 copies â = s_a q_a, b̂ = s_b q_b (round to nearest),
|â - a| <= u |a| + s h   (u = 2^-(mantissa bits + 1): relative error of normals;
                          h = half the subnormal spacing: absolute error of tiny values),
so elementwise |ŷ - y| <= sum_k (e_a |b| + |a| e_b + e_a e_b) plus f32 accumulation error.
The scales s are recomputed here from the recipe's definition (numpy amax), not read from the
implementation, so a wrong scale or a wrong operand breaks the bound.

impl="pallas" (run through the Mosaic GPU interpreter on CPU) is held to the same bound, and to
impl="xla" itself: both sum the same FP8 products in f32, in different orders, so each is within
gamma_n sum_k |â_k b̂_k| of the exact sum of those products (Higham; n = the contraction length plus
the block partial sums and scale multiplications), and they differ by at most twice that.
"""

import doctest
import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ops.fp8_dense import QUANTIZE_MAX_K, _fp8_dense, _quantize_rows, dense_reference, fp8_dense
from jaxrec.ops.fp8_scaling import BLOCK, RECIPES, cast_fp8, scaled_matmul
from kernels_pallas.fp8_quantize_sm90 import fp8_quantize, fp8_quantize_reference

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
on_gpu = any(d.platform == "gpu" for d in jax.devices())

FORMATS = {  # mantissa bits, max, smallest subnormal
    jnp.float8_e4m3fn: (3, 448.0, 2.0 ** -9),
    jnp.float8_e5m2: (2, 57344.0, 2.0 ** -16),
}


def _blockwise_amax(x, rb, cb):
  """amax over blocks of rb x cb (None = whole axis), broadcast back to x's shape."""
  m, k = x.shape
  rb, cb = rb or m, cb or k
  pm, pk = -(-m // rb) * rb, -(-k // cb) * cb
  p = np.zeros((pm, pk), np.float64)
  p[:m, :k] = np.abs(x)
  a = p.reshape(pm // rb, rb, pk // cb, cb).max(axis=(1, 3))
  return np.repeat(np.repeat(a, rb, 0), cb, 1)[:m, :k]


def _scales(x, recipe, side, fmax):
  """Expected per-element scale of operand x: side 'a' is [M, K], side 'b' is [K, N]."""
  if recipe == "tensor":
    amax = np.full(x.shape, np.abs(x).max())
  elif recipe == "row":
    amax = _blockwise_amax(x, 1, None) if side == "a" else _blockwise_amax(x, None, 1)
  else:
    amax = _blockwise_amax(x, 1, BLOCK) if side == "a" else _blockwise_amax(x, BLOCK, BLOCK)
  return np.where(amax > 0, amax / fmax, 1.0)


def quantization_error(x, recipe, side, dtype):
  """Elementwise bound on |x̂ - x| for operand x ('a' [M, K] or 'b' [K, N]) quantized to dtype."""
  mant, fmax, sub = FORMATS[dtype]
  return 2.0 ** -(mant + 1) * np.abs(x) + _scales(x, recipe, side, fmax) * sub / 2


def error_bound(a, b, recipe, a_dtype, b_dtype):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ea, eb = quantization_error(a, recipe, "a", a_dtype), quantization_error(b, recipe, "b", b_dtype)
  bound = ea @ np.abs(b) + np.abs(a) @ eb + ea @ eb
  k = a.shape[1]
  return bound + (k + 2) * 2.0 ** -23 * (np.abs(a) @ np.abs(b)) + 1e-30


def realistic(shape, seed, outlier_cols=2, row_decades=0.0):
  """Normal data with a few outlier columns (x50), the spread that breaks per-tensor scaling; with
  `row_decades`, rows scaled by 10**U(-row_decades, 0) (examples of very different magnitudes: one
  tensor-wide scale pushes the small rows into FP8's subnormals, which a row recipe avoids)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 10.0 ** rng.uniform(-row_decades, 0, size=(shape[0], 1))
  if shape[1] > outlier_cols:
    x[:, rng.choice(shape[1], outlier_cols, replace=False)] *= 50.0
  return jnp.asarray(x, jnp.float32)


def within(got, a, b, recipe, a_dtype, b_dtype):
  ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  return np.all(np.abs(np.asarray(got, np.float64) - ref) <= error_bound(a, b, recipe, a_dtype, b_dtype))


SHAPES = [(1, 1, 1), (3, 200, 5), (17, 128, 128), (64, 256, 130), (5, 300, 257)]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_forward_within_format_bound(recipe, m, k, n):
  x, w = realistic((m, k), 1), realistic((k, n), 2, outlier_cols=0)
  y = jax.jit(lambda x, w: fp8_dense(x, w, recipe=recipe))(x, w)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  assert within(y, x, w, recipe, jnp.float8_e4m3fn, jnp.float8_e4m3fn)


@pytest.mark.parametrize("recipe", RECIPES)
def test_really_quantized_not_folded_to_f32(recipe):
  """XLA must not fold the FP8 casts away: the error has the size the format implies."""
  x, w = realistic((64, 256), 3, 0), realistic((256, 64), 4, 0)
  y = np.asarray(fp8_dense(x, w, recipe=recipe), np.float64)
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  rel = np.linalg.norm(y - ref, axis=1) / np.linalg.norm(ref, axis=1)  # per row
  assert np.all(rel > 2.0 ** -4 / 20) and np.all(rel < 2.0 ** -4)


def test_row_and_block_scaling_beat_tensor_scaling_on_outliers():
  """Mean per-row relative error, on rows whose magnitudes span four decades: a row recipe that
  took one tensor-wide scale would tie with "tensor" (it did pass `row <= 1.01 x tensor`)."""
  x, w = realistic((64, 512), 5, outlier_cols=4, row_decades=4), realistic((512, 64), 6, 0)
  ref = np.asarray(dense_reference(x, w), np.float64)
  err = {r: np.mean(np.linalg.norm(np.asarray(fp8_dense(x, w, recipe=r), np.float64) - ref, axis=1)
                    / np.linalg.norm(ref, axis=1)) for r in RECIPES}
  assert err["block"] < 0.8 * err["tensor"] and err["row"] < 0.8 * err["tensor"], err


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m,k,n", [(3, 200, 5), (64, 256, 130)])
def test_gradients_within_bound(recipe, m, k, n):
  x, w = realistic((m, k), 7), realistic((k, n), 8, 0)
  c = realistic((m, n), 9, 0)  # d loss / d y
  loss = lambda x, w: jnp.sum(fp8_dense(x, w, recipe=recipe) * c)  # noqa: E731
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  ref_dx, ref_dw = jax.grad(lambda x, w: jnp.sum(dense_reference(x, w) * c), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(ref_dx, np.asarray(c) @ np.asarray(w).T, rtol=1e-4, atol=1e-3)
  assert within(dx, c, w.T, recipe, jnp.float8_e5m2, jnp.float8_e4m3fn)
  assert within(dw, x.T, c, recipe, jnp.float8_e4m3fn, jnp.float8_e5m2)


@pytest.mark.parametrize("recipe", RECIPES)
def test_gradients_are_the_documented_fp8_gemms(recipe):
  """dx = dy @ w.T from e5m2 dy and e4m3 w, dw = x.T @ dy from e4m3 x and e5m2 dy, each operand
  quantized along that GEMM's contraction: bit for bit scaled_matmul of those operands. The format
  bounds above cannot tell e5m2 dy from the more precise e4m3 (which saturates sooner)."""
  x, w, c = realistic((17, 200), 40), realistic((200, 72), 41, 0), realistic((17, 72), 42, 0)
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_dense(x, w, recipe=recipe) * c), argnums=(0, 1))(x, w)
  np.testing.assert_array_equal(dx, scaled_matmul(c, w.T, recipe=recipe, a_dtype=E5M2, b_dtype=E4M3))
  np.testing.assert_array_equal(dw, scaled_matmul(x.T, c, recipe=recipe, a_dtype=E4M3, b_dtype=E5M2))
  # negative control: the same GEMMs with dy in e4m3 give other values
  assert not np.array_equal(dx, scaled_matmul(c, w.T, recipe=recipe, a_dtype=E4M3, b_dtype=E4M3))
  assert not np.array_equal(dw, scaled_matmul(x.T, c, recipe=recipe, a_dtype=E4M3, b_dtype=E4M3))


def test_negative_control_wrong_operand_fails_the_bound():
  x, w = realistic((17, 128), 10), realistic((128, 33), 11, 0)
  other = realistic((128, 33), 12, 0)
  assert within(fp8_dense(x, w), x, w, "row", jnp.float8_e4m3fn, jnp.float8_e4m3fn)
  assert not within(fp8_dense(x, other), x, w, "row", jnp.float8_e4m3fn, jnp.float8_e4m3fn)


def test_large_inputs_are_scaled_into_range_not_nan():
  """Current scaling maps |x| up to 1e6 into the format's range (a fixed scale would give NaN)."""
  x = jnp.asarray([[1e6, -1e6, 3.0]], jnp.float32)
  w = jnp.ones((3, 2), jnp.float32)
  for r in RECIPES:
    assert np.all(np.isfinite(scaled_matmul(x, w, recipe=r)))


def test_cast_clips_to_the_format_range():
  """With current scaling x / scale never leaves the range, so the test above passes without the
  clip; a scale below amax / fmax (delayed scaling's stale history) needs it: out-of-range values
  saturate at the format's own max instead of casting to NaN."""
  x = jnp.asarray([1e6, -1e6, 3.0], jnp.float32)
  for dtype, (_, fmax, _) in FORMATS.items():
    q = np.asarray(cast_fp8(x, jnp.float32(1.0), dtype).astype(jnp.float32))
    np.testing.assert_array_equal(q, [fmax, -fmax, 3.0])


def test_bad_arguments_are_clear():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  with pytest.raises(ValueError, match="unknown FP8 recipe"):
    fp8_dense(x, w, recipe="channel")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
    fp8_dense(x, jnp.ones((7, 3)))
  with pytest.raises(ValueError, match="impl must be one of"):
    fp8_dense(x, w, impl="cuda")
  with pytest.raises(ValueError, match="interpret=True applies to impl='pallas' only"):
    fp8_dense(x, w, interpret=True)
  if not on_gpu:
    with pytest.raises(ValueError, match="interpret=True to run the kernels"):
      fp8_dense(x, w, impl="pallas")


def test_docstring_example():
  result = doctest.testmod(importlib.import_module("jaxrec.ops.fp8_dense"))
  assert result.attempted > 0 and result.failed == 0


# impl="pallas": the kernels, through the Mosaic GPU interpreter on CPU


def summation_bound(a, b, recipe, a_dtype, b_dtype):
  """Elementwise bound on |pallas - xla| for a @ b: 2 gamma_n sum_k |â_k||b̂_k|, |x̂| <= |x| + e_x.

  n = C + ceil(C / 128) + 3: C products summed, the block recipe's partial sums, two scale
  multiplications and the output rounding.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mag = ((np.abs(a) + quantization_error(a, recipe, "a", a_dtype))
         @ (np.abs(b) + quantization_error(b, recipe, "b", b_dtype)))
  c = a.shape[1]
  n = c + -(-c // BLOCK) + 3
  u = 2.0 ** -24
  return 2 * n * u / (1 - n * u) * mag + 1e-30


def agree(got, want, a, b, recipe, a_dtype, b_dtype):
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  return bool(np.all(diff <= summation_bound(a, b, recipe, a_dtype, b_dtype)))


@functools.cache
def _y_and_grads_fn(impl, recipe):
  interpret = impl == "pallas" and not on_gpu

  def f(x, w, c):
    y, vjp = jax.vjp(lambda x, w: fp8_dense(x, w, recipe=recipe, impl=impl, interpret=interpret), x, w)
    return (y, *vjp(c))

  return jax.jit(f)


def _y_and_grads(impl, recipe, x, w, c):
  """(y, dx, dw) for cotangent c: one jitted forward + backward (compiled once per shape)."""
  return _y_and_grads_fn(impl, recipe)(x, w, c)


# M = 1 and 200 pad to the GEMM's row tile; K = 136 and N = 72, 130 are not multiples of 128, so
# every GEMM (forward, dx contracting N, dw contracting M) has padded tiles and block remainders
PALLAS_SHAPES = [(1, 136, 72), (200, 136, 72), (64, 256, 130)]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m,k,n", PALLAS_SHAPES)
def test_pallas_matches_xla_and_reference(recipe, m, k, n):
  x, w, c = realistic((m, k), 21), realistic((k, n), 22, 0), realistic((m, n), 23, 0)
  y, dx, dw = _y_and_grads("pallas", recipe, x, w, c)
  y_x, dx_x, dw_x = _y_and_grads("xla", recipe, x, w, c)
  assert (y.shape, dx.shape, dw.shape) == ((m, n), (m, k), (k, n))
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  # the same numerics as impl="xla", up to f32 summation order
  assert agree(y, y_x, x, w, recipe, E4M3, E4M3)
  assert agree(dx, dx_x, c, w.T, recipe, E5M2, E4M3)
  assert agree(dw, dw_x, x.T, c, recipe, E4M3, E5M2)
  # and within the format bound of the exact product and of jax.grad of the reference
  ref_dx, ref_dw = jax.grad(lambda x, w: jnp.sum(dense_reference(x, w) * c), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(ref_dx, np.asarray(c) @ np.asarray(w).T, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ref_dw, np.asarray(x).T @ np.asarray(c), rtol=1e-4, atol=1e-3)
  assert within(y, x, w, recipe, E4M3, E4M3)
  assert within(dx, c, w.T, recipe, E5M2, E4M3)
  assert within(dw, x.T, c, recipe, E4M3, E5M2)


def test_pallas_negative_control_wrong_operands_fail():
  """The same checks on a product of the wrong weight and cotangent: every one must fail."""
  m, k, n = PALLAS_SHAPES[1]
  x, w, c = realistic((m, k), 21), realistic((k, n), 22, 0), realistic((m, n), 23, 0)
  w_bad, c_bad = realistic((k, n), 24, 0), realistic((m, n), 25, 0)
  y, dx, dw = _y_and_grads("pallas", "row", x, w_bad, c_bad)
  y_x, dx_x, dw_x = _y_and_grads("xla", "row", x, w, c)
  assert not agree(y, y_x, x, w, "row", E4M3, E4M3)
  assert not agree(dx, dx_x, c, w.T, "row", E5M2, E4M3)
  assert not agree(dw, dw_x, x.T, c, "row", E4M3, E5M2)
  assert not within(y, x, w, "row", E4M3, E4M3)
  assert not within(dx, c, w.T, "row", E5M2, E4M3)
  assert not within(dw, x.T, c, "row", E4M3, E5M2)


def test_pallas_bf16_in_bf16_out():
  """bf16 x and w: y, dx, dw in bf16, each one bf16 rounding of f32 results that agree as above."""
  m, k, n = PALLAS_SHAPES[2]
  bf16 = jnp.bfloat16
  x, w, c = (realistic(s, seed, o).astype(bf16) for s, seed, o in (((m, k), 26, 2), ((k, n), 27, 0),
                                                                     ((m, n), 28, 0)))
  got = _y_and_grads("pallas", "block", x, w, c)
  want = _y_and_grads("xla", "block", x, w, c)
  assert all(v.dtype == bf16 for v in (*got, *want))
  for g, v, a, b, a_dtype, b_dtype in zip(got, want, (x, c, x.T), (w, w.T, c), (E4M3, E5M2, E4M3),
                                          (E4M3, E4M3, E5M2)):
    g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
    tol = summation_bound(a, b, "block", a_dtype, b_dtype) + 2.0 ** -8 * (np.abs(g) + np.abs(v))
    assert np.all(np.abs(g - v) <= tol)


@pytest.mark.parametrize("dtype", list(QUANTIZE_MAX_K), ids=str)
def test_quantize_row_limit_is_the_kernels(dtype):
  """QUANTIZE_MAX_K restates fp8_quantize's shared-memory limit: the kernel takes that row, not one more."""
  limit = QUANTIZE_MAX_K[dtype]
  quantize = lambda v: fp8_quantize(v, interpret=True)  # noqa: E731
  jax.eval_shape(quantize, jax.ShapeDtypeStruct((8, limit), dtype))
  with pytest.raises(NotImplementedError, match="too large"):
    jax.eval_shape(quantize, jax.ShapeDtypeStruct((8, limit + 1), dtype))


@pytest.mark.parametrize("recipe", ["row", "block"])
def test_rows_longer_than_the_kernel_quantize_in_xla(recipe):
  """A contraction past the kernel's limit (the dw GEMM at large batch) quantizes in XLA, same values."""
  k = QUANTIZE_MAX_K[jnp.dtype(jnp.bfloat16)] + 1
  v = realistic((4, k), 29).astype(jnp.bfloat16)
  q, s = jax.jit(lambda v: _quantize_rows(v, E5M2, recipe, True))(v)
  q_ref, s_ref = fp8_quantize_reference(v, recipe=recipe, dtype=E5M2)
  assert q.shape == q_ref.shape and s.shape == s_ref.shape
  np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(q_ref, np.float32))
  np.testing.assert_array_equal(s, s_ref)


# Mosaic GPU kernels per forward + backward: 3 GEMMs, plus the quantize kernels of the row (6
# operands) and block (the 3 activation-side operands) recipes; "tensor" quantizes in XLA
KERNELS_PER_STEP = {"tensor": 3, "row": 9, "block": 6}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_pallas_forward_and_backward_lower_for_sm90_without_a_gpu(recipe, dtype):
  """The compiled (not interpreted) path: every GEMM and quantization of the step is a Mosaic GPU
  kernel, and each passes Mosaic GPU's layout inference and lowering for sm90 (the interpreter
  checks neither). _fp8_dense directly: fp8_dense refuses impl="pallas" on a CPU backend."""
  def step(x, w, c):
    y, vjp = jax.vjp(lambda x, w: _fp8_dense(recipe, "pallas", False, x, w), x, w)
    return (y, *vjp(c))

  m, k, n = PALLAS_SHAPES[1]
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape in ((m, k), (k, n), (m, n))]
  text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == KERNELS_PER_STEP[recipe]


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA Hopper GPU (compiled Mosaic GPU kernels)")
def test_compiled_on_gpu_matches_xla():
  m, k, n = 1000, 1024, 520
  x, w, c = realistic((m, k), 30), realistic((k, n), 31, 0), realistic((m, n), 32, 0)
  for recipe in RECIPES:
    got, want = _y_and_grads("pallas", recipe, x, w, c), _y_and_grads("xla", recipe, x, w, c)
    for g, v, a, b, a_dtype, b_dtype in zip(got, want, (x, c, x.T), (w, w.T, c), (E4M3, E5M2, E4M3),
                                            (E4M3, E4M3, E5M2)):
      assert agree(g, v, a, b, recipe, a_dtype, b_dtype)


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_operands_give_no_nan(recipe):
  """amax / fmax below the smallest normal f32 flushes to 0 on XLA:CPU: without a floor on the
  scale, the zeros of such a row or block became 0 / 0 = NaN (an output gradient of 1e-36 in one
  column made dw NaN)."""
  x = jnp.asarray([[1e-37, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]], jnp.float32)
  w = jnp.ones((4, 3), jnp.float32)
  y = np.asarray(scaled_matmul(x, w, recipe=recipe))
  assert np.all(np.isfinite(y)) and np.allclose(y[1], 10.0, rtol=2 ** -3)
  assert np.all(np.abs(y[0]) <= 2e-37)
  xs, ws = realistic((8, 16), 30), realistic((16, 4), 31, 0)
  c = jnp.zeros((8, 4)).at[:, 0].set(1e-36)  # d loss / d y: tiny in one column, zero elsewhere
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_dense(x, w, recipe=recipe) * c), argnums=(0, 1))(xs, ws)
  assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
  np.testing.assert_allclose(dw[:, 0], np.asarray(xs).T @ np.asarray(c[:, 0]), rtol=0.2, atol=1e-38)


@pytest.mark.parametrize("recipe", RECIPES)
def test_zero_rows_and_blocks_give_zeros_not_nan(recipe):
  """All-zero rows (padding rows of a batch) and whole zero 128-blocks quantize with scale 1 to
  zeros: forward and both gradients stay finite and exact there."""
  x = np.array(realistic((6, 300), 32))
  x[[1, 4]] = 0.0          # padding rows
  x[0, 128:256] = 0.0      # a zero 1 x 128 block
  w = np.array(realistic((300, 140), 33, 0))
  w[:, 3] = 0.0            # a dead output column
  x, w = jnp.asarray(x), jnp.asarray(w)
  c = realistic((6, 140), 34, 0).at[2].set(0.0)
  y = fp8_dense(x, w, recipe=recipe)
  dx, dw = jax.grad(lambda x, w: jnp.sum(fp8_dense(x, w, recipe=recipe) * c), argnums=(0, 1))(x, w)
  assert all(np.all(np.isfinite(v)) for v in (y, dx, dw))
  assert np.all(np.asarray(y)[[1, 4]] == 0) and np.all(np.asarray(y)[:, 3] == 0)
  assert within(y, x, w, recipe, E4M3, E4M3)
