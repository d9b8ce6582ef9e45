"""FP8 scaling recipes and the scaled matmul they define (plain JAX; the XLA path and reference).

A scaled matmul computes y = a @ b for a [M, K], b [K, N] from FP8 copies of both operands:
each operand is divided by a scale, clipped to the format's range and cast (casting an
out-of-range value to float8_e4m3fn gives NaN, so the clip is required), the FP8 GEMM accumulates
in f32, and the scales are applied to the result. Recipes differ in how many scales there are:

    "tensor"  one scale per operand
    "row"     a: one scale per row (amax over K); b: one per output column (amax over K);
              both factor out of the K sum, so y = (qa @ qb) * sa[:, None] * sb[None, :]
    "block"   a: one scale per row and 128-wide K block (1 x 128); b: one per 128 x 128 block;
              scales vary along K, so the K blocks are multiplied and scaled separately, then summed

K is zero-padded to a multiple of 128 for "block" (zeros change no sum). Scale = amax / fmax,
or 1 where the amax is 0, and at least the smallest normal f32 (SCALE_MIN): below amax ~ 5e-36
(e4m3; 7e-34 for e5m2) amax / fmax would be subnormal, which XLA:CPU (and any flush-to-zero
backend) reads as 0, so x / scale gave 0 / 0 = NaN for the zeros of that row or block.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Recipe = Literal["tensor", "row", "block"]
RECIPES: tuple[str, ...] = ("tensor", "row", "block")
BLOCK = 128
E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
SCALE_MIN = float(jnp.finfo(jnp.float32).tiny)  # 2^-126: a scale never flushes to zero


def fp8_max(dtype) -> float:
  return float(jnp.finfo(dtype).max)


def scale_from_amax(amax: jax.Array, dtype) -> jax.Array:
  """Dequantization scale amax / fmax of `dtype` (1 where amax is 0; at least SCALE_MIN), f32,
  amax's shape."""
  amax = amax.astype(jnp.float32)
  return jnp.where(amax > 0, jnp.maximum(amax / fp8_max(dtype), SCALE_MIN), 1.0)


def cast_fp8(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  """x / scale clipped to the range of `dtype` (casting out-of-range values would give NaN), cast."""
  m = fp8_max(dtype)
  return jnp.clip(x.astype(jnp.float32) / scale, -m, m).astype(dtype)


def quantize_lhs(a: jax.Array, dtype, recipe: Recipe) -> tuple[jax.Array, jax.Array]:
  """a [M, K] -> (q [M, K'] fp8, scale): scale [] / [M, 1] / [M, K'/128] for tensor / row / block."""
  if recipe == "tensor":
    s = scale_from_amax(jnp.max(jnp.abs(a)), dtype)
  elif recipe == "row":
    s = scale_from_amax(jnp.max(jnp.abs(a), axis=1, keepdims=True), dtype)
  elif recipe == "block":
    a = _pad_k(a, axis=1)
    m, k = a.shape
    s = scale_from_amax(jnp.max(jnp.abs(a.reshape(m, k // BLOCK, BLOCK)), axis=2), dtype)  # [M, KB]
    return cast_fp8(a, jnp.repeat(s, BLOCK, axis=1), dtype), s
  else:
    raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {RECIPES}")
  return cast_fp8(a, s, dtype), s


def quantize_rhs(b: jax.Array, dtype, recipe: Recipe) -> tuple[jax.Array, jax.Array]:
  """b [K, N] -> (q [K', N'] fp8, scale): scale [] / [1, N] / [K'/128, N'/128]."""
  if recipe == "tensor":
    s = scale_from_amax(jnp.max(jnp.abs(b)), dtype)
  elif recipe == "row":
    s = scale_from_amax(jnp.max(jnp.abs(b), axis=0, keepdims=True), dtype)
  elif recipe == "block":
    b = _pad_k(_pad_k(b, axis=0), axis=1)
    k, n = b.shape
    s = scale_from_amax(jnp.max(jnp.abs(b.reshape(k // BLOCK, BLOCK, n // BLOCK, BLOCK)), axis=(1, 3)), dtype)
    full = jnp.repeat(jnp.repeat(s, BLOCK, axis=0), BLOCK, axis=1)
    return cast_fp8(b, full, dtype), s
  else:
    raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {RECIPES}")
  return cast_fp8(b, s, dtype), s


def _pad_k(x: jax.Array, axis: int) -> jax.Array:
  pad = (-x.shape[axis]) % BLOCK
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def scaled_matmul(a: jax.Array, b: jax.Array, *, recipe: Recipe, a_dtype=E4M3, b_dtype=E4M3,
                  out_dtype=jnp.float32) -> jax.Array:
  """y [M, N] ~= a [M, K] @ b [K, N] through FP8 operands under `recipe` (f32 accumulation)."""
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"scaled_matmul needs a [M, K] and b [K, N], got {a.shape} and {b.shape}")
  m, n = a.shape[0], b.shape[1]
  qa, sa = quantize_lhs(a, a_dtype, recipe)
  qb, sb = quantize_rhs(b, b_dtype, recipe)
  if recipe in ("tensor", "row"):
    y = jax.lax.dot_general(qa, qb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * sa * sb).astype(out_dtype)
  kb = qa.shape[1] // BLOCK
  # per K block: [M, KB, N'] partial products, each scaled by its lhs row-block and rhs block scale
  parts = jnp.einsum("mkc,kcn->mkn", qa.reshape(m, kb, BLOCK), qb.reshape(kb, BLOCK, qb.shape[1]),
                     preferred_element_type=jnp.float32)
  sb_full = jnp.repeat(sb, BLOCK, axis=1)  # [KB, N']
  y = jnp.sum(parts * sa[:, :, None] * sb_full[None], axis=1)
  return y[:, :n].astype(out_dtype)
