"""A multilayer perceptron of nnx.Linear layers.

x [B, in] -> [B, sizes[-1]]. Each layer is Linear -> (BlockNorm) -> activation; the activation
(and BlockNorm) are skipped after the last layer when `final_activation` is False. Parameters are
f32; the matmuls run in `dtype` (bf16 on GPU). `use_bias=False` and `block_norm=True` are LoKA's
NoBias and BlockNorm Mods.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers.blocknorm import BLOCK, block_norm as _block_norm

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "hard_swish": jax.nn.hard_swish,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nnx.Module):

  def __init__(self, in_features: int, sizes: tuple[int, ...], *, act: str = "relu",
               final_activation: bool = True, use_bias: bool = True, block_norm: bool = False,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if not sizes:
      raise ValueError("an MLP needs at least one layer size")
    self.act = activation(act)
    self.final_activation = final_activation
    self.block_norm = block_norm
    if block_norm:
      for s in sizes:
        if s % min(BLOCK, s):
          raise ValueError(f"BlockNorm needs layer widths that are multiples of {BLOCK} (or below it), got {s}")
    dims = (in_features,) + tuple(sizes)
    self.layers = nnx.List([
        nnx.Linear(a, b, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                   rngs=rngs)
        for a, b in zip(dims[:-1], dims[1:])
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if self.final_activation or i < n - 1:
        x = self.act(_block_norm(x) if self.block_norm else x)
    return x
