"""fp8_dense: y = x @ w with FP8 GEMMs forward and backward (custom_vjp).

Forward: x and w in e4m3 (`jaxrec.ops.fp8_scaling.scaled_matmul` under the chosen recipe).
Backward: the output gradient in e5m2 (wider range, fewer mantissa bits), so
    dx = dy @ w.T   (e5m2 x e4m3)        dw = x.T @ dy   (e4m3 x e5m2)
each operand quantized along its own contraction axis for that GEMM. Shapes: x [M, K], w [K, N]
-> y [M, N] in x's dtype; gradients in the dtypes of x and w.

Two implementations of the same numerics, chosen by argument:
  impl="xla"     plain JAX (`scaled_matmul`): the CPU path, and the reference for the kernels.
  impl="pallas"  kernels_pallas (Mosaic GPU, sm90). Each GEMM is a @ b_nk.T with both operands
                 K-major (contraction axis last), the layout the FP8 WGMMA needs:
                     GEMM     contracts   a               b_nk
                     y        K           x [M, K]        w.T [N, K]
                     dx       N           dy [M, N]       w [K, N]
                     dw       M           x.T [K, M]      dy.T [N, M]
                 so w is transposed per forward call and x, dy per dw call (XLA transposes
                 before quantization). Quantization along the contraction axis, per recipe:
                     "tensor"  both operands with fp8_scaling.quantize_lhs (a global amax is no
                               one-pass kernel), then fp8_gemm_sm90.fp8_gemm with constant scale
                               vectors
                     "row"     both operands with fp8_quantize_sm90.fp8_quantize(recipe="row"),
                               then fp8_gemm
                     "block"   a with fp8_quantize(recipe="block") (1 x 128), b_nk with
                               fp8_scaling.quantize_rhs (128 x 128 blocks have no kernel yet),
                               then fp8_gemm_sm90.fp8_gemm_blockwise
                 The quantize kernel keeps a whole row in shared memory: for a contraction
                 longer than it takes (padded to 128: 8320 bf16, 10112 f32 elements; in
                 practice the dw GEMM at batch sizes above that) the row and block quantization
                 of that GEMM run in XLA (fp8_scaling.quantize_lhs, the kernel's definition;
                 same values). The GEMMs always run in the kernels.
                 The two impls agree up to f32 summation order (and, on CPU only, the rare fp8
                 rounding tie that fp8_quantize_sm90's docstring describes).

`fp8_gemm_nt` is one of these GEMMs on its own (forward only, optionally with the kernels' fused
BlockNorm / activation epilogue); jaxrec.ops.planned_dense routes each GEMM of a site through it.

`interpret=True` (impl="pallas" only) runs the kernels through jax's Mosaic GPU interpreter, which
is how they are tested on CPU; it is slow and for tests only. impl="pallas" without it on a
backend other than GPU raises a ValueError rather than picking the interpreter behind the caller's
back.

>>> y = fp8_dense(jnp.ones((2, 3)), jnp.full((3, 4), 0.5), recipe="row")
>>> y.shape, bool(jnp.allclose(y, 1.5, rtol=2 ** -4))
((2, 4), True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrec.ops.fp8_scaling import BLOCK, E4M3, E5M2, RECIPES, Recipe, quantize_lhs, quantize_rhs, scaled_matmul
from kernels_pallas.fp8_gemm_sm90 import epilogue_reference, fp8_gemm, fp8_gemm_blockwise
from kernels_pallas.fp8_quantize_sm90 import fp8_quantize

IMPLS: tuple[str, ...] = ("xla", "pallas")
# fp8_quantize's longest padded row per input dtype (its docstring: one row tile must fit in
# shared memory); tests/ops/test_fp8_dense.py checks these against the kernel
QUANTIZE_MAX_K = {jnp.dtype(jnp.bfloat16): 8320, jnp.dtype(jnp.float32): 10112}


def fp8_dense(x: jax.Array, w: jax.Array, *, recipe: Recipe = "row", impl: str = "xla",
              interpret: bool = False) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] through FP8 GEMMs (forward e4m3, gradients e5m2).

  impl "xla" or "pallas" (see the module docstring); interpret=True runs the Pallas kernels
  through the Mosaic GPU interpreter (CPU tests).
  """
  if recipe not in RECIPES:
    raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {RECIPES}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"fp8_dense needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  if interpret and impl != "pallas":
    raise ValueError("interpret=True applies to impl='pallas' only")
  check_backend(impl, interpret)
  return _fp8_dense(recipe, impl, interpret, x, w)


def check_backend(impl: str, interpret: bool) -> None:
  """Raises ValueError for impl="pallas" without interpret=True on a backend other than GPU."""
  if impl == "pallas" and not interpret and jax.default_backend() != "gpu":
    raise ValueError(f"impl='pallas' runs Mosaic GPU kernels (sm90) and the default backend is "
                     f"{jax.default_backend()!r}: use impl='xla', or interpret=True to run the kernels "
                     "through the Mosaic GPU interpreter (slow; for tests)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fp8_dense(recipe: Recipe, impl: str, interpret: bool, x: jax.Array, w: jax.Array) -> jax.Array:
  return fp8_gemm_nt(x, w.T, recipe=recipe, a_dtype=E4M3, b_dtype=E4M3, out_dtype=x.dtype, impl=impl,
                     interpret=interpret)


def _fwd(recipe, impl, interpret, x, w):
  return _fp8_dense(recipe, impl, interpret, x, w), (x, w)


def _bwd(recipe, impl, interpret, res, dy):
  x, w = res
  gemm = functools.partial(fp8_gemm_nt, recipe=recipe, impl=impl, interpret=interpret)
  dx = gemm(dy, w, a_dtype=E5M2, b_dtype=E4M3, out_dtype=x.dtype)      # dy @ w.T, contracts N
  dw = gemm(x.T, dy.T, a_dtype=E4M3, b_dtype=E5M2, out_dtype=w.dtype)  # x.T @ dy, contracts M
  return dx, dw


_fp8_dense.defvjp(_fwd, _bwd)


def fp8_gemm_nt(a: jax.Array, b_nk: jax.Array, *, recipe: Recipe, a_dtype, b_dtype, out_dtype, impl: str,
                interpret: bool, norm: str | None = None, activation: str | None = None) -> jax.Array:
  """act(norm(a [M, C] @ b_nk [N, C].T)) -> [M, N], both operands quantized along the contraction C.

  One GEMM of fp8_dense. norm (None or "block") and activation (None, "relu", "hard_swish") are
  the kernels' epilogue (kernels_pallas.fp8_gemm_sm90), applied in f32 to the scaled f32 product
  before the cast to out_dtype: fused into the kernel for impl="pallas", `epilogue_reference`
  after scaled_matmul for impl="xla". Forward only (no custom_vjp here).
  """
  if impl == "xla":
    if norm is None and activation is None:
      return scaled_matmul(a, b_nk.T, recipe=recipe, a_dtype=a_dtype, b_dtype=b_dtype, out_dtype=out_dtype)
    y = scaled_matmul(a, b_nk.T, recipe=recipe, a_dtype=a_dtype, b_dtype=b_dtype, out_dtype=jnp.float32)
    return epilogue_reference(y, norm=norm, activation=activation).astype(out_dtype)
  qb, sb = quantize_weight_nk(b_nk, recipe=recipe, dtype=b_dtype, impl=impl, interpret=interpret)
  return _gemm_prequantized(a, qb, sb, n=b_nk.shape[0], recipe=recipe, a_dtype=a_dtype, out_dtype=out_dtype,
                            impl=impl, interpret=interpret, norm=norm, activation=activation)


def quantize_weight_nk(b_nk: jax.Array, *, recipe: Recipe, dtype=E4M3, impl: str,
                       interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The rhs b_nk [N, C] of a GEMM quantized along C once, in the layout
  `fp8_gemm_nt_prequantized` takes for `impl` -> (q, scale):

      recipe    q          scale, impl "xla"       scale, impl "pallas"
      tensor    [N, C]     []                      []
      row       [N, C]     [N, 1]                  [N]
      block     [N', C']   [N'/128, C'/128]        [N'/128, C'/128]      (N', C' padded to 128)

  For inference, where a weight does not change between calls: quantize it once at load (the
  (N, K) pre-quantized layout XLA's cuBLASLt FP8 path needs, ../shared/reference/h100_baseline.md)
  instead of per call. Same values as the per-call quantization inside `fp8_gemm_nt`.
  """
  if recipe not in RECIPES:
    raise ValueError(f"unknown FP8 recipe {recipe!r}; choose one of {RECIPES}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if recipe == "block":  # 128 x 128 blocks are symmetric: quantize_rhs of b_nk is b's, transposed
    return quantize_rhs(b_nk, dtype, "block")
  if impl == "xla" or recipe == "tensor":  # one global amax: the layout does not matter
    return quantize_lhs(b_nk, dtype, recipe)
  return _quantize_rows(b_nk, dtype, "row", interpret)


def fp8_gemm_nt_prequantized(a: jax.Array, qb: jax.Array, sb: jax.Array, *, n: int, recipe: Recipe, a_dtype=E4M3,
                             out_dtype, impl: str, interpret: bool = False, norm: str | None = None,
                             activation: str | None = None, rowwise_a: bool = False) -> jax.Array:
  """act(norm(a [M, C] @ b_nk [N, C].T)) -> [M, N] with b_nk given as `quantize_weight_nk`'s (qb, sb)
  (for the same recipe and impl); a is quantized along C here. Forward only, no gradients: an
  inference path. Otherwise `fp8_gemm_nt` (which is this after quantize_weight_nk).

  rowwise_a (recipe "tensor"): a is scaled per row (each row's amax) instead of by the amax of all
  of a, so that each output row depends on its own row of a alone, as under "row" and "block" (a
  server's batch holds unrelated requests); b keeps its per-tensor scale."""
  check_backend(impl, interpret)
  return _gemm_prequantized(a, qb, sb, n=n, recipe=recipe, a_dtype=a_dtype, out_dtype=out_dtype, impl=impl,
                            interpret=interpret, norm=norm, activation=activation, rowwise_a=rowwise_a)


def _gemm_prequantized(a, qb, sb, *, n, recipe, a_dtype, out_dtype, impl, interpret, norm, activation,
                       rowwise_a=False):
  m = a.shape[0]
  a_recipe = "row" if rowwise_a and recipe == "tensor" else recipe
  if impl == "xla":
    qa, sa = quantize_lhs(a, a_dtype, a_recipe)  # "tensor" with rowwise_a: sa [M, 1] times the scalar sb
    if recipe in ("tensor", "row"):
      y = jax.lax.dot_general(qa, qb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      y = y * sa * (sb if recipe == "tensor" else sb.T)
    else:
      kb = qa.shape[1] // BLOCK
      parts = jnp.einsum("mkc,nkc->mkn", qa.reshape(m, kb, BLOCK), qb.reshape(qb.shape[0], kb, BLOCK),
                         preferred_element_type=jnp.float32)
      y = jnp.sum(parts * sa[:, :, None] * jnp.repeat(sb, BLOCK, axis=0).T[None], axis=1)[:, :n]
    if norm is None and activation is None:
      return y.astype(out_dtype)
    return epilogue_reference(y, norm=norm, activation=activation).astype(out_dtype)
  epilogue = dict(norm=norm, activation=activation, out_dtype=out_dtype, interpret=interpret)
  if recipe == "tensor":
    if rowwise_a:
      qa, sa = _quantize_rows(a, a_dtype, "row", interpret)
    else:
      qa, sa = quantize_lhs(a, a_dtype, "tensor")
      sa = jnp.full((m,), sa)
    return fp8_gemm(qa, qb, sa, jnp.full((n,), sb), **epilogue)
  qa, sa = _quantize_rows(a, a_dtype, recipe, interpret)
  if recipe == "row":
    return fp8_gemm(qa, qb, sa, sb, **epilogue)
  if norm is not None:  # BlockNorm's blocks are over the N real columns: the kernel pads N itself
    return fp8_gemm_blockwise(qa, qb[:n], sa, sb, **epilogue)
  return fp8_gemm_blockwise(qa, qb, sa, sb, **epilogue)[:, :n]


def _quantize_rows(v: jax.Array, dtype, recipe: Recipe, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """v [R, C] quantized along C: row -> (q [R, C], scale [R]); block -> (q [R, C'], scale [R, C'/128]).

  fp8_quantize where one padded row fits its shared-memory tile, else quantize_lhs (same values).
  """
  if v.dtype not in QUANTIZE_MAX_K:
    v = v.astype(jnp.float32)  # exact, and what quantize_lhs computes in anyway
  if -(-v.shape[1] // 128) * 128 <= QUANTIZE_MAX_K[v.dtype]:
    return fp8_quantize(v, recipe=recipe, dtype=dtype, interpret=interpret)
  q, s = quantize_lhs(v, dtype, recipe)
  return q, (s[:, 0] if recipe == "row" else s)


def dense_reference(x: jax.Array, w: jax.Array) -> jax.Array:
  """The f32 product the FP8 path approximates."""
  return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest").astype(x.dtype)
