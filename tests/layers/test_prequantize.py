"""Weights quantized once for inference (Dense.prequantize) give the per-call FP8 forward's outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.layers import Dense, prequantize_fp8_weights
from jaxrec.ops.fp8_dense import fp8_gemm_nt, fp8_gemm_nt_prequantized, quantize_weight_nk
from jaxrec.ops.fp8_scaling import E4M3
from jaxrec.precision.plan import SitePrecision


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _forward(module, x):
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def _close(a, b):
  """Equal up to f32 summation order: a few f32 ulps of the output's scale."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  tol = 8 * np.finfo(np.float32).eps * np.max(np.abs(b))
  return np.max(np.abs(a - b)) <= tol


@pytest.mark.parametrize("recipe", ["tensor", "row", "block"])
@pytest.mark.parametrize("m,k,n", [(37, 200, 130), (8, 256, 256)])
def test_prequantized_gemm_is_the_per_call_gemm(recipe, m, k, n):
  a, w = _x((m, k), 1), _x((k, n), 2) * 0.1
  want = fp8_gemm_nt(a, w.T, recipe=recipe, a_dtype=E4M3, b_dtype=E4M3, out_dtype=jnp.float32, impl="xla",
                     interpret=False)
  qb, sb = quantize_weight_nk(w.T, recipe=recipe, impl="xla")
  got = fp8_gemm_nt_prequantized(a, qb, sb, n=n, recipe=recipe, out_dtype=jnp.float32, impl="xla")
  assert got.shape == (m, n) and qb.dtype == E4M3
  assert _close(got, want)
  # negative control: the weight quantized under another recipe is not the same GEMM
  other = "row" if recipe != "row" else "tensor"
  qo, so = quantize_weight_nk(w.T * jnp.linspace(0.1, 3.0, n)[:, None], recipe=other, impl="xla")
  wrong = fp8_gemm_nt_prequantized(a, qo, so, n=n, recipe=other, out_dtype=jnp.float32, impl="xla")
  assert not _close(wrong, want)


@pytest.mark.parametrize("numerics", ["fp8_tensor", "fp8_row", "fp8_block"])
@pytest.mark.parametrize("fused", [False, True])
def test_dense_prequantized_matches_per_call(numerics, fused):
  kw = dict(norm="block", activation="hard_swish") if fused else {}
  d = Dense(96, 256, use_bias=not fused, dtype=jnp.bfloat16, precision=SitePrecision.uniform(numerics),
            rngs=nnx.Rngs(0))
  x = _x((33, 96), 3, jnp.bfloat16)
  graphdef, state = nnx.split(d)
  f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kw))
  want = f(state, x)
  assert d.prequantize()
  graphdef2, state2 = nnx.split(d)
  got = jax.jit(lambda s, x: nnx.merge(graphdef2, s)(x, **kw))(state2, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  # bf16 outputs: equal, or one bf16 rounding apart where the f32 sums differed in the last bit
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)
  assert float(jnp.mean(jnp.asarray(got != want, jnp.float32))) < 0.01


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_rowwise_tensor_gemm_rows_do_not_depend_on_the_other_rows(impl):
  """rowwise_a (a server's batch of unrelated requests): under "tensor" each output row is what its
  input row gives alone, however large the other rows; without it one amax over every row of a
  couples them (the negative control)."""
  m, k, n = 37, 200, 130
  a, w = _x((m, k), 1), _x((k, n), 2) * 0.1
  a = a.at[20:].multiply(1e5)  # the other rows: far larger than the first 20
  interpret = impl == "pallas" and jax.default_backend() != "gpu"
  qb, sb = quantize_weight_nk(w.T, recipe="tensor", impl=impl, interpret=interpret)

  def gemm(a, rowwise_a):
    return np.asarray(fp8_gemm_nt_prequantized(a, qb, sb, n=n, recipe="tensor", out_dtype=jnp.float32, impl=impl,
                                               interpret=interpret, rowwise_a=rowwise_a))

  alone = gemm(a[:20], True)
  np.testing.assert_allclose(gemm(a, True)[:20], alone, rtol=1e-6, atol=0)
  want = np.asarray(a[:20]) @ np.asarray(w)  # an FP8 product of those rows (e4m3: 3 mantissa bits)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(alone, want, rtol=0, atol=0.1 * scale)
  coupled = gemm(a, False)[:20] - gemm(a[:20], False)
  assert np.max(np.abs(coupled)) > 0.3 * scale  # their amax flushes most of the first rows to 0


def test_prequantize_skips_non_fp8_sites_and_keeps_the_copy_fixed():
  d_plain = Dense(16, 8, rngs=nnx.Rngs(0))
  assert not d_plain.prequantize()
  mlp_like = nnx.List([Dense(16, 8, precision=SitePrecision.uniform("fp8_row"), rngs=nnx.Rngs(1)), d_plain])
  assert prequantize_fp8_weights(mlp_like) == ["0"]
  d = mlp_like[0]
  x = _x((4, 16), 5)
  before = _forward(d, x)
  d.kernel[...] = d.kernel[...] * 2.0  # the quantized copy does not follow: call prequantize again
  np.testing.assert_array_equal(_forward(d, x), before)
  d.prequantize()
  np.testing.assert_allclose(_forward(d, x), 2.0 * before, rtol=0.07)


@pytest.mark.parametrize("recipe,kernels", [("tensor", 1), ("row", 2), ("block", 2)])
def test_pallas_prequantized_forward_lowers_to_sm90_kernels_without_weight_quantization(recipe, kernels):
  """Compiled path (lowered for cuda, not run): the GEMM and the activation's quantization are
  Mosaic GPU kernels and nothing quantizes the weight any more (the per-call forward has one more
  quantize kernel for row)."""
  import re

  from jaxrec.ops.fp8_dense import _gemm_prequantized
  m, k, n = 256, 384, 256
  w = _x((k, n), 2)
  qb, sb = quantize_weight_nk(w.T, recipe=recipe, impl="pallas", interpret=True)

  def fwd(a, qb, sb):
    return _gemm_prequantized(a, qb, sb, n=n, recipe=recipe, a_dtype=E4M3, out_dtype=jnp.bfloat16, impl="pallas",
                              interpret=False, norm=None, activation=None)

  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct(qb.shape, qb.dtype),
          jax.ShapeDtypeStruct(sb.shape, sb.dtype))
  text = jax.jit(fwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu", text)) == kernels


@pytest.mark.parametrize("prequantized", [False, True])
def test_wrong_input_width_is_a_clear_error(prequantized):
  """An input of the wrong width is a ValueError naming the shapes on every path; the prequantized
  one used to fail inside dot_general with a TypeError."""
  d = Dense(16, 8, use_bias=False, precision=SitePrecision.uniform("fp8_row"), rngs=nnx.Rngs(0))
  if prequantized:
    assert d.prequantize()
  with pytest.raises(ValueError, match=r"needs x \[\.\.\., 16\], got shape \(4, 12\)"):
    d(jnp.ones((4, 12)))


def test_dense_prequantize_rowwise_inputs_decouples_the_rows():
  """Dense.prequantize(rowwise_inputs=True) (the serving path, train/bench_precision.py) reaches the
  GEMM: an fp8_tensor site's rows then do not depend on the other rows of the batch. Without the
  flag they do (the negative control); the test above checks the GEMM, not that the layer passes it."""
  x = _x((37, 200), 1).at[20:].multiply(1e5)  # the other rows: far larger than the first 20

  def outputs(rowwise_inputs):
    d = Dense(200, 130, use_bias=False, precision=SitePrecision.uniform("fp8_tensor"), rngs=nnx.Rngs(0))
    assert d.prequantize(rowwise_inputs=rowwise_inputs)
    return np.asarray(_forward(d, x))[:20], np.asarray(_forward(d, x[:20]))

  batch, alone = outputs(True)
  np.testing.assert_allclose(batch, alone, rtol=1e-6, atol=0)
  batch, alone = outputs(False)
  assert np.max(np.abs(batch - alone)) > 0.3 * np.max(np.abs(alone))
