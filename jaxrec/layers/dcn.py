"""DCNv2 cross network (Wang et al. 2021, "DCN V2").

Each layer: x_{l+1} = x0 * (W x_l + b) + x_l, with W [d, d] full rank or, when `rank` is set,
the low-rank product V (U x_l), U [d, r], V [r, d] (the "DCN-Mix"-free low-rank form used by
MLPerf DLRMv2). x0, x_l: [B, d]. The projections are Dense layers: GEMM sites
"<path>.layers.<l>.v" and, low-rank, "<path>.layers.<l>.u", each as the PrecisionPlan says
(plain `dtype` without one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers.dense import Dense, site_precision
from jaxrec.precision.plan import PrecisionPlan


class CrossLayer(nnx.Module):

  def __init__(self, dim: int, *, rank: int | None, use_bias: bool = True, dtype: jnp.dtype = jnp.float32,
               plan: PrecisionPlan | None = None, path: str = "", rngs: nnx.Rngs):
    """plan: per-GEMM precision of the sites f"{path}.u" and f"{path}.v"; None = plain `dtype`."""
    def site(name: str):
      return site_precision(plan, f"{path}.{name}" if path else name, dtype)

    if rank is None:
      self.u = None
      self.v = Dense(dim, dim, use_bias=use_bias, dtype=dtype, precision=site("v"), rngs=rngs)
    else:
      self.u = Dense(dim, rank, use_bias=False, dtype=dtype, precision=site("u"), rngs=rngs)
      self.v = Dense(rank, dim, use_bias=use_bias, dtype=dtype, precision=site("v"), rngs=rngs)

  def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
    h = x if self.u is None else self.u(x)
    return x0 * self.v(h) + x


class CrossNetwork(nnx.Module):

  def __init__(self, dim: int, num_layers: int, *, rank: int | None = None, use_bias: bool = True,
               dtype: jnp.dtype = jnp.float32, plan: PrecisionPlan | None = None, path: str = "",
               rngs: nnx.Rngs):
    """plan: per-GEMM precision of the sites f"{path}.layers.{l}.u|v"; None = plain `dtype`."""
    prefix = f"{path}.layers" if path else "layers"
    self.layers = nnx.List([CrossLayer(dim, rank=rank, use_bias=use_bias, dtype=dtype, plan=plan,
                                       path=f"{prefix}.{i}", rngs=rngs)
                            for i in range(num_layers)])

  def __call__(self, x0: jax.Array) -> jax.Array:
    x = x0
    for layer in self.layers:
      x = layer(x0, x)
    return x
