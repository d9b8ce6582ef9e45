"""delayed_dense: per-tensor FP8 with scales from an amax history (TransformerEngine's delayed scaling)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ops.delayed_dense import delayed_dense, delayed_dense_reference, delayed_scale, init_history
from jaxrec.ops.fp8_dense import fp8_dense
from jaxrec.ops.fp8_scaling import E4M3, fp8_max

SHAPES = [(37, 200, 130), (64, 96, 40), (5, 3, 7)]


def _x(shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _history(x, w, dy, length=8, grow=1.0):
  """A history whose amaxes are those of x, w, dy times `grow` (a previous step's)."""
  h = init_history(length)
  amax = jnp.stack([jnp.max(jnp.abs(v)) for v in (x, w, dy)]) * grow
  return h.at[:, 0].set(amax)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_forward_matches_reference_and_f32_within_the_format(m, k, n):
  x, w = _x((m, k), 1), _x((k, n), 2, 0.1)
  h = _history(x, w, _x((m, n), 3), grow=1.3)
  y = jax.jit(delayed_dense)(x, w, h)
  ref, _ = delayed_dense_reference(x, w, h)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  exact = x @ w
  assert _rel(y, exact) < 0.08  # e4m3 x e4m3: about 0.04 of the output's norm
  assert _rel(y, exact) > 1e-3  # really quantized


def test_empty_history_is_current_per_tensor_scaling():
  """First step: the current amax, i.e. exactly fp8_dense's 'tensor' recipe, forward and backward."""
  x, w, c = _x((37, 200), 1), _x((200, 130), 2, 0.1), _x((37, 130), 3)
  h = init_history(4)
  f_del = lambda x, w: jnp.sum(delayed_dense(x, w, h) * c)  # noqa: E731
  f_cur = lambda x, w: jnp.sum(fp8_dense(x, w, recipe="tensor") * c)  # noqa: E731
  for a, b in zip(jax.grad(f_del, (0, 1))(x, w), jax.grad(f_cur, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
  np.testing.assert_allclose(delayed_dense(x, w, h), fp8_dense(x, w, recipe="tensor"), rtol=1e-5, atol=1e-5)


def test_history_gradient_is_the_updated_history():
  x, w, c = _x((16, 24), 1), _x((24, 8), 2), _x((16, 8), 3)
  h = init_history(5).at[:, :3].set(jnp.arange(9.0).reshape(3, 3) + 1)
  dx, dw, new = jax.grad(lambda x, w, h: jnp.sum(delayed_dense(x, w, h) * c), (0, 1, 2))(x, w, h)
  want0 = [float(jnp.max(jnp.abs(x))), float(jnp.max(jnp.abs(w))), float(jnp.max(jnp.abs(c)))]  # dy = c
  np.testing.assert_allclose(new[:, 0], want0, rtol=1e-6)
  np.testing.assert_array_equal(new[:, 1:], h[:, :-1])
  # gradients of x and w: FP8 (e5m2 dy) close to the exact ones
  assert _rel(dx, c @ w.T) < 0.15 and _rel(dw, x.T @ c) < 0.15


def test_each_operand_is_scaled_by_its_own_history_row():
  """x, w and dy each quantized with the amax of their own history row (not the current amax, not
  another row's), against a plain restatement of the recipe. The rows hold 1.7, 2.9 and 3.3 times the
  operands' amaxes: factors that are not powers of two, to which FP8 rounding is blind."""
  x, w, c = _x((37, 200), 1), _x((200, 130), 2, 0.1), _x((37, 130), 3)
  h = init_history(4).at[:, 1].set(jnp.stack([jnp.max(jnp.abs(v)) for v in (x, w, c)]) * jnp.array([1.7, 2.9, 3.3]))
  y, vjp = jax.vjp(lambda x, w: delayed_dense(x, w, h), x, w)
  dx, dw = vjp(c)

  def q(v, row, dtype):  # (fp8 values as f32, scale)
    s = np.float32(np.max(np.asarray(h[row]))) / np.float32(jnp.finfo(dtype).max)
    fmax = float(jnp.finfo(dtype).max)
    return np.asarray(jnp.asarray(np.clip(np.asarray(v) / s, -fmax, fmax)).astype(dtype), np.float64), float(s)

  (qx, sx), (qw, sw), (qc, sc) = q(x, 0, E4M3), q(w, 1, E4M3), q(c, 2, jnp.float8_e5m2)
  for got, want in ((y, qx @ qw * sx * sw), (dx, qc @ qw.T * sc * sw), (dw, qx.T @ qc * sx * sc)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_stale_small_history_saturates_instead_of_nan_and_is_really_used():
  """Negative control: a history 4x below the current amax clips the large values (TE's known
  failure mode), so the result is far worse than current scaling; never NaN or inf."""
  x, w = _x((64, 96), 1), _x((96, 40), 2)
  stale = _history(x, w, _x((64, 40), 3), grow=0.25)
  y = delayed_dense(x, w, stale)
  assert bool(jnp.all(jnp.isfinite(y)))
  exact = x @ w
  assert _rel(y, exact) > 3 * _rel(delayed_dense(x, w, init_history(4)), exact)
  # and a larger history than needed only costs resolution, mildly
  big = _history(x, w, _x((64, 40), 3), grow=4.0)
  assert _rel(delayed_dense(x, w, big), exact) < 0.15


def test_scale_rule():
  h = jnp.array([0.0, 3.0, 1.0])
  assert float(delayed_scale(h, jnp.float32(100.0), E4M3)) == pytest.approx(3.0 / fp8_max(E4M3))
  assert float(delayed_scale(jnp.zeros(3), jnp.float32(2.0), E4M3)) == pytest.approx(2.0 / fp8_max(E4M3))
  assert float(delayed_scale(jnp.zeros(3), jnp.float32(0.0), E4M3)) == 1.0


def test_bad_arguments_are_clear():
  x, w = _x((4, 3), 1), _x((3, 2), 2)
  with pytest.raises(ValueError, match=r"\[3, H\]"):
    delayed_dense(x, w, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="x \\[M, K\\]"):
    delayed_dense(x, _x((4, 2), 3), init_history(2))
  with pytest.raises(ValueError, match="impl"):
    delayed_dense(x, w, init_history(2), impl="cuda")
  with pytest.raises(ValueError, match="length"):
    init_history(0)


def test_pallas_interpret_matches_xla():
  x, w, c = _x((64, 128), 1, 2.0), _x((128, 128), 2, 0.1), _x((64, 128), 3)
  h = _history(x, w, c, grow=1.1)

  def f(impl, interpret):
    return jax.value_and_grad(lambda x, w, h: jnp.sum(delayed_dense(x, w, h, impl=impl, interpret=interpret) * c),
                              (0, 1, 2))(x, w, h)

  (lx, gx), (lp, gp) = f("xla", False), f("pallas", True)
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  for a, b in zip(gp, gx):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_pallas_step_lowers_for_sm90_without_a_gpu(dtype):
  """The compiled path (lowered for cuda, not run): forward, dgrad and wgrad are three Mosaic GPU
  GEMMs; the casts to FP8 are XLA elementwise ops (no quantize kernel: the scales are known)."""
  import re

  from jaxrec.ops.delayed_dense import _delayed

  def step(x, w, h, c):
    y, vjp = jax.vjp(lambda x, w, h: _delayed("pallas", False, x, w, h), x, w, h)
    return (y, *vjp(c))

  m, k, n = 200, 136, 72
  args = [jax.ShapeDtypeStruct(s, d) for s, d in (((m, k), dtype), ((k, n), dtype), ((3, 16), jnp.float32),
                                                 ((m, n), dtype))]
  text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 3


def test_a_non_finite_step_does_not_poison_the_history():
  """An overflowing step (inf in dy, or in x) records a non-finite amax; the scale ignores it, as
  TransformerEngine and flax's fp8_ops do, instead of being inf (all values 0, outputs NaN) for the
  next H steps."""
  x, w, c = _x((16, 24), 1), _x((24, 8), 2), _x((16, 8), 3)
  grad = jax.grad(lambda x, w, h, c: jnp.sum(delayed_dense(x, w, h) * c), (0, 1, 2))
  h = init_history(4)
  _, _, h = grad(x, w, h, c)
  _, _, h = grad(x.at[0, 0].set(jnp.inf), w, h, c.at[0, 0].set(jnp.inf))  # the overflowing step
  assert not bool(jnp.all(jnp.isfinite(h[:, 0])))  # recorded as seen
  y = delayed_dense(x, w, h)
  dx, dw, _ = grad(x, w, h, c)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in (y, dx, dw))
  assert _rel(y, x @ w) < 0.08 and _rel(dx, c @ w.T) < 0.15 and _rel(dw, x.T @ c) < 0.15
  assert float(delayed_scale(jnp.array([jnp.inf, 2.0, jnp.nan]), jnp.float32(5.0), E4M3)) == pytest.approx(
      2.0 / fp8_max(E4M3))
