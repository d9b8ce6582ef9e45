"""fp8_dense: y = x @ w with FP8 GEMMs forward and backward (custom_vjp).

Forward: x and w in e4m3 (`jaxrec.ops.fp8_scaling.scaled_matmul` under the chosen recipe).
Backward: the output gradient in e5m2 (wider range, fewer mantissa bits), so
    dx = dy @ w.T   (e5m2 x e4m3)        dw = x.T @ dy   (e4m3 x e5m2)
each operand quantized along its own contraction axis for that GEMM. Shapes: x [M, K], w [K, N]
-> y [M, N] in x's dtype; gradients in the dtypes of x and w.

`impl="xla"` is plain JAX (the CPU path, and the reference for the Pallas kernels);
`impl="pallas"` will route to kernels_pallas once the forward and gradient kernels of every recipe
exist; it raises until then (kernels_pallas.fp8_gemm_sm90 is the first, forward-only kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrec.ops.fp8_scaling import E4M3, E5M2, RECIPES, Recipe, scaled_matmul


def fp8_dense(x: jax.Array, w: jax.Array, *, recipe: Recipe = "row", impl: str = "xla") -> jax.Array:
  """x [M, K] @ w [K, N] through FP8 GEMMs (forward e4m3, gradients e5m2)."""
  if recipe not in RECIPES:
    raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {RECIPES}")
  if impl == "pallas":
    raise NotImplementedError("impl='pallas' is not wired yet: kernels_pallas.fp8_gemm_sm90 covers only "
                              "the forward GEMM of the tensor and row recipes so far; use impl='xla'")
  if impl != "xla":
    raise ValueError(f"impl must be 'xla' or 'pallas', got {impl!r}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"fp8_dense needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  return _fp8_dense(recipe, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_dense(recipe: Recipe, x: jax.Array, w: jax.Array) -> jax.Array:
  return scaled_matmul(x, w, recipe=recipe, a_dtype=E4M3, b_dtype=E4M3, out_dtype=x.dtype)


def _fwd(recipe, x, w):
  return _fp8_dense(recipe, x, w), (x, w)


def _bwd(recipe, res, dy):
  x, w = res
  dx = scaled_matmul(dy, w.T, recipe=recipe, a_dtype=E5M2, b_dtype=E4M3, out_dtype=x.dtype)
  dw = scaled_matmul(x.T, dy, recipe=recipe, a_dtype=E4M3, b_dtype=E5M2, out_dtype=w.dtype)
  return dx, dw


_fp8_dense.defvjp(_fwd, _bwd)


def dense_reference(x: jax.Array, w: jax.Array) -> jax.Array:
  """The f32 product the FP8 path approximates."""
  return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest").astype(x.dtype)
