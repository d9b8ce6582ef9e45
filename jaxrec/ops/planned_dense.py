"""planned_dense: y = x @ w with each of its three GEMMs in the numerics a precision plan chose.

A dense site runs three GEMMs, and a `SitePrecision` (jaxrec.precision.plan) gives each its own
`GemmChoice` (numerics "f32", "bf16", "fp8_tensor", "fp8_row", "fp8_block"; impl "xla" or "pallas"):

    GEMM    computes          FP8 operand formats   result dtype
    fwd     y  = x @ w        x e4m3,  w e4m3       x's
    dgrad   dx = dy @ w.T     dy e5m2, w e4m3       x's
    wgrad   dw = x.T @ dy     x e4m3,  dy e5m2      w's

with x [M, K], w [K, N], y and dy [M, N]. Per GEMM:
  "f32", "bf16"  both operands cast to that dtype, one lax.dot_general with the result in that dtype
                 (accumulated in f32 on CPU and GPU), then cast to the result dtype above. This is
                 what nnx.Linear(dtype=...) and JAX's own transpose of it compute.
  "fp8_*"        jaxrec.ops.fp8_dense's GEMM under that recipe and impl (`fp8_gemm_nt`), quantized
                 along its contraction axis, f32 accumulation, result straight in the dtype above.

A site whose three GEMMs share one f32/bf16 numerics is the plain `dot(x.astype(d), w.astype(d))`
differentiated by JAX (no custom_vjp): bit for bit the nnx.Linear(dtype=d) path it replaces.
Any other site goes through one custom_vjp that keeps x and w as residuals and runs dgrad and wgrad
as chosen; a uniform fp8 site gives exactly fp8_dense(x, w, recipe=..., impl=...).

Fused epilogue (LoKA's Mods in the FP8 kernel): with `norm="block"` and/or `activation` ("relu",
"hard_swish"), planned_dense returns act(norm(x @ w)), computed in f32 on the GEMM's f32 result
before the one cast to x's dtype, as kernels_pallas.fp8_gemm_sm90 defines it. Only for a site whose
forward GEMM is fp8 (`fuses(site, norm, activation)`): impl "pallas" runs it inside the FP8 GEMM
kernel, impl "xla" as `epilogue_reference` after the fake-quant GEMM (same numerics, the reference).
The backward recomputes the forward GEMM's pre-epilogue f32 result y (the kernel writes only the
activation), backpropagates through `epilogue_reference` with jax.vjp, and runs dgrad and wgrad on
that gradient as the site chose: one extra forward GEMM per training step, in exchange for not
writing and re-reading y (not measured on an H100 yet; XLA may merge the two for impl "xla").

`interpret=True` runs the site's impl="pallas" GEMMs through the Mosaic GPU interpreter (CPU tests)
and does nothing to the others; impl="pallas" without it on a non-GPU backend is a ValueError.

>>> from jaxrec.precision.plan import GemmChoice, SitePrecision
>>> site = SitePrecision(fwd=GemmChoice("fp8_row"), dgrad=GemmChoice("bf16"), wgrad=GemmChoice("f32"))
>>> y = planned_dense(jnp.ones((2, 3)), jnp.full((3, 4), 0.5), site)
>>> y.shape, bool(jnp.allclose(y, 1.5, rtol=2 ** -4))
((2, 4), True)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxrec.ops.fp8_dense import check_backend, fp8_gemm_nt
from jaxrec.ops.fp8_scaling import E4M3, E5M2
from kernels_pallas.fp8_gemm_sm90 import ACTIVATIONS as EPILOGUE_ACTIVATIONS
from kernels_pallas.fp8_gemm_sm90 import NORMS as EPILOGUE_NORMS
from kernels_pallas.fp8_gemm_sm90 import epilogue_reference

if TYPE_CHECKING:  # jaxrec.precision imports jaxrec.ops: no import of it here at run time
  from jaxrec.precision.plan import GemmChoice, SitePrecision

PLAIN_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# dot_general dimension numbers of each GEMM on the untransposed operands, as JAX's own transpose
# rule of x @ w writes them: fwd x [M, K] . w [K, N]; dgrad dy [M, N] . w [K, N] over N; wgrad
# x [M, K] . dy [M, N] over M
_FWD, _DGRAD, _WGRAD = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ())), (((0,), (0,)), ((), ()))


def fuses(site: SitePrecision, norm: str | None, activation: str | None) -> bool:
  """Whether planned_dense can fuse this epilogue for this site: a non-empty norm / activation
  that the FP8 kernels' epilogue has, and a forward GEMM in fp8."""
  return (site.fwd.is_fp8 and not site.is_delayed and (norm is not None or activation is not None)
          and norm in EPILOGUE_NORMS and activation in EPILOGUE_ACTIVATIONS)


def planned_dense(x: jax.Array, w: jax.Array, site: SitePrecision, *, norm: str | None = None,
                  activation: str | None = None, interpret: bool = False) -> jax.Array:
  """act(norm(x [M, K] @ w [K, N])) -> [M, N] in x's dtype, each GEMM as `site` chose.

  norm / activation: the fused epilogue (None, None: none); see the module docstring.
  Gradients come back in the dtypes of x and w.
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"planned_dense needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
  if site.is_delayed:
    raise ValueError("an fp8_delayed site needs its amax history: run it through jaxrec.ops.delayed_dense "
                     "(jaxrec.layers.Dense does), not planned_dense")
  for c in (site.fwd, site.dgrad, site.wgrad):
    check_backend(c.impl, interpret)
  if norm is not None or activation is not None:
    if not fuses(site, norm, activation):
      raise ValueError(f"planned_dense fuses norm in {EPILOGUE_NORMS} and activation in "
                       f"{tuple(EPILOGUE_ACTIVATIONS)} into an fp8 forward GEMM only; got norm={norm!r}, "
                       f"activation={activation!r} with forward numerics {site.fwd.numerics!r}: apply them "
                       "after the call instead")
  elif not site.any_fp8 and site.fwd.numerics == site.dgrad.numerics == site.wgrad.numerics:
    return _plain(x, w, _FWD, site.fwd, x.dtype)  # JAX's autodiff: exactly nnx.Linear(dtype=d)
  return _planned(site, norm, activation, interpret, x, w)


def _plain(a: jax.Array, b: jax.Array, dims, choice: GemmChoice, out_dtype) -> jax.Array:
  d = PLAIN_DTYPES[choice.numerics]
  return jax.lax.dot_general(a.astype(d), b.astype(d), dims).astype(out_dtype)


def _forward(site, norm, activation, interpret, x, w, *, epilogue: bool = True, out_dtype=None):
  c = site.fwd
  out_dtype = x.dtype if out_dtype is None else out_dtype
  if c.is_fp8:
    return fp8_gemm_nt(x, w.T, recipe=c.recipe, a_dtype=E4M3, b_dtype=E4M3, out_dtype=out_dtype, impl=c.impl,
                       interpret=interpret, norm=norm if epilogue else None,
                       activation=activation if epilogue else None)
  return _plain(x, w, _FWD, c, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _planned(site: SitePrecision, norm: str | None, activation: str | None, interpret: bool, x: jax.Array,
             w: jax.Array) -> jax.Array:
  return _forward(site, norm, activation, interpret, x, w)


def _fwd(site, norm, activation, interpret, x, w):
  return _forward(site, norm, activation, interpret, x, w), (x, w)


def _bwd(site, norm, activation, interpret, res, dz):
  x, w = res
  dy = dz
  if norm is not None or activation is not None:
    y = _forward(site, norm, activation, interpret, x, w, epilogue=False, out_dtype=jnp.float32)
    _, vjp = jax.vjp(lambda y: epilogue_reference(y, norm=norm, activation=activation), y)
    dy = vjp(dz.astype(jnp.float32))[0].astype(dz.dtype)
  c = site.dgrad
  if c.is_fp8:  # dy @ w.T, contracts N
    dx = fp8_gemm_nt(dy, w, recipe=c.recipe, a_dtype=E5M2, b_dtype=E4M3, out_dtype=x.dtype, impl=c.impl,
                     interpret=interpret)
  else:
    dx = _plain(dy, w, _DGRAD, c, x.dtype)
  c = site.wgrad
  if c.is_fp8:  # x.T @ dy, contracts M
    dw = fp8_gemm_nt(x.T, dy.T, recipe=c.recipe, a_dtype=E4M3, b_dtype=E5M2, out_dtype=w.dtype, impl=c.impl,
                     interpret=interpret)
  else:
    dw = _plain(x, dy, _WGRAD, c, w.dtype)
  return dx, dw


_planned.defvjp(_fwd, _bwd)
