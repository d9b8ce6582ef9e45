"""DCNv2 cross network (Wang et al. 2021, "DCN V2").

Each layer: x_{l+1} = x0 * (W x_l + b) + x_l, with W [d, d] full rank or, when `rank` is set,
the low-rank product V (U x_l), U [d, r], V [r, d] (the "DCN-Mix"-free low-rank form used by
MLPerf DLRMv2). x0, x_l: [B, d].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class CrossLayer(nnx.Module):

  def __init__(self, dim: int, *, rank: int | None, use_bias: bool = True, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    kw = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=init, rngs=rngs)
    if rank is None:
      self.u = None
      self.v = nnx.Linear(dim, dim, use_bias=use_bias, **kw)
    else:
      self.u = nnx.Linear(dim, rank, use_bias=False, **kw)
      self.v = nnx.Linear(rank, dim, use_bias=use_bias, **kw)

  def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
    h = x if self.u is None else self.u(x)
    return x0 * self.v(h) + x


class CrossNetwork(nnx.Module):

  def __init__(self, dim: int, num_layers: int, *, rank: int | None = None, use_bias: bool = True,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.layers = nnx.List([CrossLayer(dim, rank=rank, use_bias=use_bias, dtype=dtype, rngs=rngs)
                            for _ in range(num_layers)])

  def __call__(self, x0: jax.Array) -> jax.Array:
    x = x0
    for layer in self.layers:
      x = layer(x0, x)
    return x
