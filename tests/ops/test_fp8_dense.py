"""fp8_dense (XLA path) against f32 with an error bound derived from the FP8 formats.

For y = a @ b computed from FP8 copies â = s_a q_a, b̂ = s_b q_b (round to nearest),
|â - a| <= u |a| + s h   (u = 2^-(mantissa bits + 1): relative error of normals;
                          h = half the subnormal spacing: absolute error of tiny values),
so elementwise |ŷ - y| <= sum_k (e_a |b| + |a| e_b + e_a e_b) plus f32 accumulation error.
The scales s are recomputed here from the recipe's definition (numpy amax), not read from the
implementation, so a wrong scale or a wrong operand breaks the bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ops.fp8_dense import dense_reference, fp8_dense
from jaxrec.ops.fp8_scaling import BLOCK, RECIPES, scaled_matmul

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


def error_bound(a, b, recipe, a_dtype, b_dtype):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  (ma, fa, sub_a), (mb, fb, sub_b) = FORMATS[a_dtype], FORMATS[b_dtype]
  ea = 2.0 ** -(ma + 1) * np.abs(a) + _scales(a, recipe, "a", fa) * sub_a / 2
  eb = 2.0 ** -(mb + 1) * np.abs(b) + _scales(b, recipe, "b", fb) * sub_b / 2
  bound = ea @ np.abs(b) + np.abs(a) @ eb + ea @ eb
  k = a.shape[1]
  return bound + (k + 2) * 2.0 ** -23 * (np.abs(a) @ np.abs(b)) + 1e-30


def realistic(shape, seed, outlier_cols=2):
  """Normal data with a few outlier columns (x50), the spread that breaks per-tensor scaling."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape)
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
  x, w = realistic((64, 512), 5, outlier_cols=4), realistic((512, 64), 6, 0)
  ref = np.asarray(dense_reference(x, w), np.float64)
  err = {r: np.linalg.norm(np.asarray(fp8_dense(x, w, recipe=r)) - ref) / np.linalg.norm(ref) for r in RECIPES}
  assert err["block"] < err["tensor"] and err["row"] <= err["tensor"] * 1.01


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


def test_negative_control_wrong_operand_fails_the_bound():
  x, w = realistic((17, 128), 10), realistic((128, 33), 11, 0)
  other = realistic((128, 33), 12, 0)
  assert within(fp8_dense(x, w), x, w, "row", jnp.float8_e4m3fn, jnp.float8_e4m3fn)
  assert not within(fp8_dense(x, other), x, w, "row", jnp.float8_e4m3fn, jnp.float8_e4m3fn)


def test_out_of_range_values_are_clipped_not_nan():
  x = jnp.asarray([[1e6, -1e6, 3.0]], jnp.float32)
  w = jnp.ones((3, 2), jnp.float32)
  for r in RECIPES:
    assert np.all(np.isfinite(scaled_matmul(x, w, recipe=r)))


def test_bad_arguments_are_clear():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  with pytest.raises(ValueError, match="unknown FP8 recipe"):
    fp8_dense(x, w, recipe="channel")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
    fp8_dense(x, jnp.ones((7, 3)))
  with pytest.raises(NotImplementedError, match="not wired yet"):
    fp8_dense(x, w, impl="pallas")
