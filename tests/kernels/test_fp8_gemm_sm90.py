"""fp8_gemm_sm90 against its jnp reference, through jax's Mosaic GPU interpreter on CPU.

The kernel and the reference see the same FP8 operands and both accumulate in f32, so with f32
output they agree to f32 summation-order error (K * 2^-24 relative to sum |a b|); with bf16
output each element may differ by one bf16 rounding (2^-8 relative) on top.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.ops.fp8_scaling import quantize_lhs
from kernels_pallas.fp8_gemm_sm90 import TuningConfig, fp8_gemm, fp8_gemm_reference

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


def check(y, a, b, sa, sb, out_dtype):
  a32, b32 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ref = np.asarray(fp8_gemm_reference(a, b, sa, sb, out_dtype=jnp.float32), np.float64)
  mag = (np.abs(a32) @ np.abs(b32).T) * np.asarray(sa)[:, None] * np.asarray(sb)[None, :]
  tol = (a.shape[1] + 2) * 2.0 ** -24 * mag
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


@pytest.mark.parametrize("m,n,k", [(100, 128, 128), (128, 1, 128), (128, 128, 200)])
def test_awkward_shapes_raise_naming_the_constraint(m, n, k):
  a = jnp.zeros((m, k), jnp.float8_e4m3fn)
  b = jnp.zeros((n, k), jnp.float8_e4m3fn)
  with pytest.raises(NotImplementedError, match="not a multiple of the tile"):
    fp8_gemm(a, b, jnp.ones(m), jnp.ones(n), interpret=True)


def test_bad_inputs_are_clear():
  a = jnp.zeros((128, 128), jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="float8"):
    fp8_gemm(a.astype(jnp.bfloat16), a, jnp.ones(128), jnp.ones(128), interpret=True)
  with pytest.raises(ValueError, match="a_scale must be"):
    fp8_gemm(a, a, jnp.ones(64), jnp.ones(128), interpret=True)
  with pytest.raises(NotImplementedError, match="only 128x128x128 tiles"):
    TuningConfig(tile_n=256)


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
