"""planned_dense: each GEMM of a site runs the numerics its SitePrecision chose.

Routing is checked bit for bit: a GEMM's result under a mixed site equals that GEMM's result under
the uniform site of its own choice (uniform f32/bf16 = nnx.Linear's autodiff, uniform fp8 =
fp8_dense). Accuracy against jax.grad of the f32 reference is held to the format bounds of
tests/ops/test_fp8_dense.py (fp8) and the bf16 analogue (bf16 rounds each operand and the result,
u = 2^-9). The fused epilogue is checked against epilogue_reference after the same GEMM (impl
"xla", then impl "pallas" through the Mosaic GPU interpreter).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.ops.fp8_dense import dense_reference, fp8_dense
from jaxrec.ops.planned_dense import _planned, fuses, planned_dense
from jaxrec.precision.plan import GemmChoice, SitePrecision
from kernels_pallas.fp8_gemm_sm90 import epilogue_reference
from tests.ops.test_fp8_dense import E4M3, E5M2, on_gpu, realistic, summation_bound, within

M, K, N = 24, 136, 72  # K and N not multiples of 128: padded blocks in every fp8 GEMM
FORMATS = {"fwd": (E4M3, E4M3), "dgrad": (E5M2, E4M3), "wgrad": (E4M3, E5M2)}


def _operands(dtype=jnp.float32, m=M, k=K, n=N, seed=0):
  x, w, c = realistic((m, k), seed), realistic((k, n), seed + 1, 0), realistic((m, n), seed + 2, 0)
  return x.astype(dtype), w, c.astype(dtype)


def _y_and_grads(f, x, w, c):
  """(y, dx, dw) of f(x, w) for output cotangent c, jitted."""
  def run(x, w, c):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(c))
  return jax.jit(run)(x, w, c)


def _equal(a, b):
  return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _same_bf16_gemm(a, b):
  """Equal up to one bf16 rounding of the result: a bf16 dot's result is bf16, but when it is
  converted on to f32 (a weight gradient) XLA may keep the f32 accumulator instead (excess
  precision), differently in different graphs."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return bool(np.all(np.abs(a - b) <= 2.0 ** -8 * np.abs(b)))


def _linear(x, w, dtype):
  """nnx.Linear(dtype=dtype, use_bias=False) on kernel w: the path plain sites must reproduce."""
  graphdef, _ = nnx.split(nnx.Linear(w.shape[0], w.shape[1], use_bias=False, dtype=dtype, rngs=nnx.Rngs(0)))
  return nnx.merge(graphdef, nnx.State({"kernel": w}))(x)


@pytest.mark.parametrize("numerics,x_dtype", [("f32", jnp.float32), ("bf16", jnp.bfloat16),
                                              ("bf16", jnp.float32)])
def test_plain_site_is_nnx_linear_bit_for_bit(numerics, x_dtype):
  x, w, c = _operands(x_dtype)
  dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[numerics]
  got = _y_and_grads(lambda x, w: planned_dense(x, w, SitePrecision.uniform(numerics)), x, w, c)
  want = _y_and_grads(lambda x, w: _linear(x, w, dtype).astype(x.dtype), x, w, c)
  assert all(_equal(g, v) and g.dtype == v.dtype for g, v in zip(got, want))
  assert got[1].dtype == x_dtype and got[2].dtype == jnp.float32


def test_custom_vjp_plain_gemms_equal_jax_autodiff():
  """The custom_vjp's f32/bf16 GEMMs (used in mixed sites) are JAX's own transposes: y and dx bit
  for bit, the bf16 dw up to XLA's excess precision."""
  x, w, c = _operands(jnp.bfloat16)
  for numerics in ("bf16", "f32"):
    site = SitePrecision.uniform(numerics)
    got = _y_and_grads(lambda x, w: _planned(site, None, None, False, x, w), x, w, c)
    want = _y_and_grads(lambda x, w: planned_dense(x, w, site), x, w, c)
    assert _equal(got[0], want[0]) and _equal(got[1], want[1])
    assert _equal(got[2], want[2]) if numerics == "f32" else _same_bf16_gemm(got[2], want[2])


@pytest.mark.parametrize("recipe", ["tensor", "row", "block"])
def test_uniform_fp8_site_is_fp8_dense(recipe):
  x, w, c = _operands()
  got = _y_and_grads(lambda x, w: planned_dense(x, w, SitePrecision.uniform(f"fp8_{recipe}")), x, w, c)
  want = _y_and_grads(lambda x, w: fp8_dense(x, w, recipe=recipe), x, w, c)
  assert all(_equal(g, v) for g, v in zip(got, want))


MIXED = [("fp8_row", "bf16", "fp8_block"), ("bf16", "fp8_tensor", "f32")]


def _uniform_result(numerics, x, w, c):
  return _y_and_grads(lambda x, w: planned_dense(x, w, SitePrecision.uniform(numerics)), x, w, c)


def within_bf16(got, a, b):
  """|got - a @ b| <= (2u + u^2) |a| @ |b| + u |a @ b| + f32 accumulation, u = 2^-9."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  u, mag = 2.0 ** -9, np.abs(a) @ np.abs(b)
  bound = (2 * u + u * u) * mag + u * np.abs(a @ b) + (a.shape[1] + 2) * 2.0 ** -23 * mag + 1e-30
  return bool(np.all(np.abs(np.asarray(got, np.float64) - a @ b) <= bound))


@pytest.mark.parametrize("numerics", MIXED, ids="-".join)
def test_mixed_site_routes_each_gemm(numerics):
  x, w, c = _operands()
  site = SitePrecision(*(GemmChoice(n) for n in numerics))
  got = _y_and_grads(lambda x, w: planned_dense(x, w, site), x, w, c)
  y, dx, dw = got
  for i, n in enumerate(numerics):
    want = _uniform_result(n, x, w, c)[i]
    assert _same_bf16_gemm(got[i], want) if n == "bf16" else _equal(got[i], want)
  # and each within its format's bound of the exact product / jax.grad of the f32 reference
  ref_dx, ref_dw = jax.grad(lambda x, w: jnp.sum(dense_reference(x, w) * c), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(ref_dx, np.asarray(c) @ np.asarray(w).T, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(ref_dw, np.asarray(x).T @ np.asarray(c), rtol=1e-4, atol=1e-3)
  for got, gemm, (a, b), n in zip((y, dx, dw), ("fwd", "dgrad", "wgrad"), ((x, w), (c, w.T), (x.T, c)), numerics):
    if n.startswith("fp8_"):
      assert within(got, a, b, n[4:], *FORMATS[gemm]), gemm
    elif n == "bf16":
      assert within_bf16(got, a, b), gemm
    else:
      np.testing.assert_allclose(got, np.asarray(a) @ np.asarray(b), rtol=1e-4, atol=1e-3)


def test_negative_control_misrouted_gemm_fails():
  """The same checks with the dgrad of another choice: equality and the bf16 bound both fail."""
  x, w, c = _operands()
  site = SitePrecision(GemmChoice("fp8_row"), GemmChoice("fp8_tensor"), GemmChoice("fp8_block"))
  _, dx, _ = _y_and_grads(lambda x, w: planned_dense(x, w, site), x, w, c)
  assert not _same_bf16_gemm(dx, _uniform_result("bf16", x, w, c)[1])
  assert not _equal(dx, _uniform_result("fp8_row", x, w, c)[1])
  assert not within_bf16(dx, c, w.T)


# the fused epilogue: act(norm(x @ w)) with the forward GEMM in fp8


def _fused_reference(site, norm, activation):
  """The fused op's definition: epilogue_reference on the forward GEMM's f32 result, autodiff."""
  return lambda x, w: epilogue_reference(planned_dense(x.astype(jnp.float32), w, site), norm=norm,
                                         activation=activation).astype(x.dtype)


@pytest.mark.parametrize("recipe,n", [("row", 256), ("block", 200)])
def test_fused_epilogue_xla_matches_its_definition_and_the_f32_reference(recipe, n):
  x, w, c = _operands(n=n, seed=3)
  site = SitePrecision(GemmChoice(f"fp8_{recipe}"), GemmChoice("bf16"), GemmChoice(f"fp8_{recipe}"))
  fused = _y_and_grads(lambda x, w: planned_dense(x, w, site, norm="block", activation="hard_swish"), x, w, c)
  want = _y_and_grads(_fused_reference(site, "block", "hard_swish"), x, w, c)
  for g, v in zip(fused, want):
    np.testing.assert_allclose(g, v, rtol=1e-6, atol=1e-6)
  # against jax.grad of the all-f32 layer: per row, the fp8 error (2^-4 relative for e4m3 operands,
  # 2^-3 for e5m2) through BlockNorm, which at most doubles a relative error
  f32 = _y_and_grads(lambda x, w: epilogue_reference(dense_reference(x, w), norm="block", activation="hard_swish"),
                     x, w, c)
  for g, v, tol in zip(fused, f32, (2 * 2.0 ** -4, 2 * 2.0 ** -3, 2 * 2.0 ** -3)):
    g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
    rel = np.linalg.norm(g - v, axis=1) / np.linalg.norm(v, axis=1)
    assert np.all(rel < tol), rel.max()
    assert np.all(rel > 0)  # really quantized


def test_fuses_and_bad_epilogues():
  fp8, bf16 = SitePrecision.uniform("fp8_row"), SitePrecision.uniform("bf16")
  assert fuses(fp8, "block", "hard_swish") and fuses(fp8, None, "relu") and fuses(fp8, "block", None)
  assert not fuses(fp8, None, None) and not fuses(fp8, "block", "silu") and not fuses(bf16, "block", "hard_swish")
  x, w = jnp.ones((4, 8)), jnp.ones((8, 256))
  with pytest.raises(ValueError, match="fp8 forward GEMM only"):
    planned_dense(x, w, bf16, norm="block", activation="hard_swish")
  with pytest.raises(ValueError, match="fp8 forward GEMM only"):
    planned_dense(x, w, fp8, activation="silu")
  with pytest.raises(ValueError, match="multiple"):
    planned_dense(x, jnp.ones((8, 300)), fp8, norm="block")
  with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
    planned_dense(x, jnp.ones((7, 3)), fp8)
  if not on_gpu:
    with pytest.raises(ValueError, match="interpret=True"):
      planned_dense(x, w, SitePrecision(wgrad=GemmChoice("fp8_row", "pallas")))


# impl="pallas" through the Mosaic GPU interpreter (slow: one small shape per check)


def _agree(got, want, a, b, recipe, formats, slack=0.0):
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  return bool(np.all(diff <= summation_bound(a, b, recipe, *formats) + slack))


def test_pallas_mixed_site_matches_xla():
  """fwd pallas row, dgrad bf16, wgrad pallas block: the xla site's values up to summation order."""
  x, w, c = _operands(m=40, n=72, seed=6)
  sites = {impl: SitePrecision(GemmChoice("fp8_row", impl), GemmChoice("bf16"), GemmChoice("fp8_block", impl))
           for impl in ("pallas", "xla")}
  got = _y_and_grads(lambda x, w: planned_dense(x, w, sites["pallas"], interpret=not on_gpu), x, w, c)
  want = _y_and_grads(lambda x, w: planned_dense(x, w, sites["xla"]), x, w, c)
  assert _agree(got[0], want[0], x, w, "row", FORMATS["fwd"])
  assert _same_bf16_gemm(got[1], want[1])  # bf16 dgrad: the same XLA dot either way
  assert _agree(got[2], want[2], x.T, c, "block", FORMATS["wgrad"])


@pytest.mark.parametrize("recipe,n", [("row", 256), ("block", 200)])
def test_pallas_fused_epilogue_matches_xla(recipe, n):
  """The kernel's fused BlockNorm + HardSwish vs the xla definition: the GEMMs agree up to f32
  summation order (summation_bound); BlockNorm scales that by at most 1/rms(block) per row and
  hard_swish has slope <= 1.5, so the epilogue's outputs agree within 1.5 * bound / rms."""
  x, w, c = _operands(m=40, n=n, seed=9)
  sites = {impl: SitePrecision.uniform(f"fp8_{recipe}", impl) for impl in ("pallas", "xla")}
  epi = dict(norm="block", activation="hard_swish")
  got = _y_and_grads(lambda x, w: planned_dense(x, w, sites["pallas"], interpret=not on_gpu, **epi), x, w, c)
  want = _y_and_grads(lambda x, w: planned_dense(x, w, sites["xla"], **epi), x, w, c)
  y = np.asarray(dense_reference(x, w), np.float64)
  width = min(256, n)
  rms = np.sqrt((y.reshape(len(y), -1, width) ** 2).mean(-1, keepdims=True))
  bound = summation_bound(x, w, recipe, *FORMATS["fwd"]).reshape(rms.shape[0], -1, width) / rms
  diff = np.abs(np.asarray(got[0], np.float64) - np.asarray(want[0], np.float64)).reshape(bound.shape)
  assert np.all(diff <= 1.5 * bound * 1.01 + 1e-6)
  # gradients: dgrad and wgrad of the epilogue's gradient, which itself differs by the forward's
  # summation-order difference; relative per row, far inside the fp8 error (2^-3)
  for g, v in zip(got[1:], want[1:]):
    g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
    assert np.all(np.linalg.norm(g - v, axis=1) <= 2.0 ** -8 * np.linalg.norm(v, axis=1) + 1e-6)


def test_pallas_fused_step_lowers_for_sm90_without_a_gpu():
  """Compiled path: forward = one quantize pair + the fused GEMM; backward = the forward GEMM
  recomputed (quantize pair + GEMM) + dgrad and wgrad (quantize pair + GEMM each): 12 kernels."""
  site = SitePrecision.uniform("fp8_row", "pallas")

  def step(x, w, c):
    y, vjp = jax.vjp(lambda x, w: _planned(site, "block", "hard_swish", False, x, w), x, w)
    return (y, *vjp(c))

  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((200, 136), (136, 256), (200, 256))]
  text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 12
