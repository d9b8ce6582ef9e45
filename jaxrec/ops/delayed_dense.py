"""delayed_dense: y = x @ w in per-tensor FP8 with delayed scaling (TransformerEngine's recipe).

Current scaling (jaxrec.ops.fp8_dense) takes each operand's amax right before quantizing it: one
extra pass over the operand per GEMM. Delayed scaling quantizes with a scale from the amax
*history* of that operand over earlier steps, and records the current amax into the history on the
way: no pass before the cast, and each operand is quantized once per step for both GEMMs that use
it (x for y and dw, w for y and dx, dy for dx and dw; the backward reuses the forward's FP8 x and
w). The price: a value above the history's amax is clipped to the format's max (a growing
operand saturates until its history catches up).

    history  f32 [3, H]: amax of x, w, dy (rows) over the last H steps, newest first (column 0)
    scale    amax / fmax with amax = max over the row's history, or the current amax when the
             history is still all zero (the first step); 1 when that is 0 too
    formats  x, w e4m3; dy e5m2 (fp8_dense's)

The updated history comes back as the *gradient* of `history`: the backward pass is where dy's
amax is known, so `jax.grad` with respect to the history returns the new history [3, H] (each
row shifted by one with this step's amax in front). A training step overwrites the state's
history with it (jaxrec.training.step); it must not feed it to an optimizer or add it to anything.
So call delayed_dense once per site and step. A forward-only call (eval, serving) uses the
history as it is and records nothing.

impl "xla" (plain JAX; the CPU path and the reference) or "pallas" (kernels_pallas.fp8_gemm_sm90
with constant scale vectors, both operands K-major; the cast is one fused XLA elementwise op
either way). `interpret=True` runs the Pallas kernel in the Mosaic GPU interpreter (tests).

>>> h = init_history(4)
>>> y = delayed_dense(jnp.ones((2, 3)), jnp.full((3, 4), 0.5), h)
>>> y.shape, bool(jnp.allclose(y, 1.5))
((2, 4), True)
>>> g = jax.grad(lambda h: delayed_dense(jnp.ones((2, 3)), jnp.full((3, 4), 0.5), h).sum())(h)
>>> g[:, 0].tolist(), g[:, 1:].tolist() == h[:, :-1].tolist()  # amax of x, w, dy recorded in front
([1.0, 0.5, 1.0], True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrec.ops.fp8_dense import IMPLS, check_backend
from jaxrec.ops.fp8_scaling import E4M3, E5M2, cast_fp8, scale_from_amax
from kernels_pallas.fp8_gemm_sm90 import fp8_gemm

AMAX_HISTORY = 1024  # TransformerEngine's DelayedScaling default amax_history_len
_NT = (((1,), (1,)), ((), ()))


def init_history(length: int = AMAX_HISTORY) -> jax.Array:
  """An empty amax history f32 [3, length] (rows x, w, dy)."""
  if length < 1:
    raise ValueError(f"the amax history needs length >= 1, got {length}")
  return jnp.zeros((3, length), jnp.float32)


def delayed_scale(history: jax.Array, current_amax: jax.Array, dtype) -> jax.Array:
  """Dequantization scale [] from one history row [H] (the current amax while the row is empty).

  Non-finite entries (a step whose operand overflowed) are ignored, as TransformerEngine and
  flax's fp8_ops keep the previous scale for them: one inf amax would otherwise set the scale to
  inf, and every value to 0 / NaN, for the next H steps."""
  amax = jnp.max(jnp.where(jnp.isfinite(history), history, 0.0))
  return scale_from_amax(jnp.where(amax > 0, amax, current_amax.astype(jnp.float32)), dtype)


def _amax(v: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(v)).astype(jnp.float32)


def _gemm_nt(a, b_nk, sa, sb, out_dtype, impl: str, interpret: bool):
  """(a [M, C] @ b_nk [N, C].T) * sa * sb -> [M, N] from FP8 operands with per-tensor scales."""
  if impl == "xla":
    y = jax.lax.dot_general(a, b_nk, _NT, preferred_element_type=jnp.float32)
    return (y * sa * sb).astype(out_dtype)
  m, n = a.shape[0], b_nk.shape[0]
  return fp8_gemm(a, b_nk, jnp.full((m,), sa), jnp.full((n,), sb), out_dtype=out_dtype, interpret=interpret)


def delayed_dense(x: jax.Array, w: jax.Array, history: jax.Array, *, impl: str = "xla",
                  interpret: bool = False) -> jax.Array:
  """x [M, K] @ w [K, N] -> [M, N] in x's dtype through per-tensor FP8 with delayed scales.

  history: f32 [3, H] (`init_history`); its gradient is the updated history (module docstring).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"delayed_dense needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  if history.ndim != 2 or history.shape[0] != 3:
    raise ValueError(f"delayed_dense needs an amax history [3, H] (rows x, w, dy), got {history.shape}")
  if interpret and impl != "pallas":
    raise ValueError("interpret=True applies to impl='pallas' only")
  check_backend(impl, interpret)
  return _delayed(impl, interpret, x, w, history.astype(jnp.float32))


def _quantize_forward(x, w, history):
  ax, aw = _amax(x), _amax(w)
  sx, sw = delayed_scale(history[0], ax, E4M3), delayed_scale(history[1], aw, E4M3)
  return cast_fp8(x, sx, E4M3), sx, cast_fp8(w, sw, E4M3), sw, ax, aw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _delayed(impl: str, interpret: bool, x: jax.Array, w: jax.Array, history: jax.Array) -> jax.Array:
  qx, sx, qw, sw, _, _ = _quantize_forward(x, w, history)
  return _gemm_nt(qx, qw.T, sx, sw, x.dtype, impl, interpret)


def _fwd(impl, interpret, x, w, history):
  qx, sx, qw, sw, ax, aw = _quantize_forward(x, w, history)
  y = _gemm_nt(qx, qw.T, sx, sw, x.dtype, impl, interpret)
  # the FP8 operands are the residuals (half the memory of bf16 activations, a quarter of f32);
  # zero-size arrays carry the dtypes of the gradients
  return y, (qx, sx, qw, sw, ax, aw, history, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _bwd(impl, interpret, res, dy):
  qx, sx, qw, sw, ax, aw, history, x_like, w_like = res
  ady = _amax(dy)
  sdy = delayed_scale(history[2], ady, E5M2)
  qdy = cast_fp8(dy, sdy, E5M2)
  dx = _gemm_nt(qdy, qw, sdy, sw, x_like.dtype, impl, interpret)        # dy @ w.T, contracts N
  dw = _gemm_nt(qx.T, qdy.T, sx, sdy, w_like.dtype, impl, interpret)    # x.T @ dy, contracts M
  new_history = jnp.concatenate([jnp.stack([ax, aw, ady])[:, None], history[:, :-1]], axis=1)
  return dx, dw, new_history


_delayed.defvjp(_fwd, _bwd)


def delayed_dense_reference(x: jax.Array, w: jax.Array, history: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(y, updated history without dy's amax) in plain jnp, f32 math: the forward's definition."""
  qx, sx, qw, sw, ax, aw = _quantize_forward(x, w, history.astype(jnp.float32))
  y = (qx.astype(jnp.float32) @ qw.astype(jnp.float32)) * sx * sw
  return y.astype(x.dtype), jnp.stack([ax, aw])
