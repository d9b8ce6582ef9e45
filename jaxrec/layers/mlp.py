"""A multilayer perceptron of Dense layers.

x [B, in] -> [B, sizes[-1]]. Each layer is Dense -> norm -> activation; norm and activation are
skipped after the last layer when `final_activation` is False. Parameters are f32; the matmuls run
in `dtype` (bf16 on GPU), or per GEMM as a PrecisionPlan says (sites "<path>.layers.<i>").

norm: "none"; "layer" (nnx.LayerNorm with a learned scale, and a bias when use_bias: the LoKA
baseline's "bias, LayerNorm, SiLU"); or "block" (BlockNorm, parameter-free RMS over 256-feature
blocks). `use_bias=False`, `norm="block"` and `act="hard_swish"` are LoKA's NoBias, BlockNorm and
HardSwish Mods. A layer with no bias whose forward GEMM the plan puts in FP8 runs its BlockNorm
(or none) and its relu / hard_swish inside the FP8 GEMM's epilogue (`Dense.fuses`); every other
layer applies them after the GEMM, in `dtype`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrec.layers.blocknorm import BLOCK, block_norm
from jaxrec.layers.dense import Dense, site_precision
from jaxrec.precision.plan import PrecisionPlan

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "hard_swish": jax.nn.hard_swish,
}
NORMS = ("none", "layer", "block")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nnx.Module):

  def __init__(self, in_features: int, sizes: tuple[int, ...], *, act: str = "relu",
               final_activation: bool = True, use_bias: bool = True, norm: str = "none",
               dtype: jnp.dtype = jnp.float32, plan: PrecisionPlan | None = None, path: str = "",
               rngs: nnx.Rngs):
    """plan: per-GEMM precision of the sites f"{path}.layers.{i}" (`path` = this module's path in
    the model); None = every GEMM plainly in `dtype`."""
    if not sizes:
      raise ValueError("an MLP needs at least one layer size")
    if norm not in NORMS:
      raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    self.act = activation(act)
    self.act_name = act
    self.final_activation = final_activation
    self.norm = norm
    if norm == "block":
      for s in sizes:
        if s % min(BLOCK, s):
          raise ValueError(f"BlockNorm needs layer widths that are multiples of {BLOCK} (or below it), got {s}")
    dims = (in_features,) + tuple(sizes)
    prefix = f"{path}.layers" if path else "layers"
    self.layers = nnx.List([
        Dense(a, b, use_bias=use_bias, dtype=dtype, precision=site_precision(plan, f"{prefix}.{i}", dtype),
              rngs=rngs)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
    ])
    if norm == "layer":  # created after the layers: the Dense initialisation does not depend on norm
      self.norms = nnx.List([nnx.LayerNorm(s, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, rngs=rngs)
                             for s in sizes])
    else:
      self.norms = None

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      if not (self.final_activation or i < n - 1):
        x = layer(x)
        continue
      kernel_norm = "block" if self.norm == "block" else None  # LayerNorm has no kernel epilogue
      if self.norm != "layer" and layer.fuses(kernel_norm, self.act_name):
        x = layer(x, norm=kernel_norm, activation=self.act_name)
        continue
      x = layer(x)
      if self.norm == "block":
        x = block_norm(x)
      elif self.norm == "layer":
        x = self.norms[i](x)
      x = self.act(x)
    return x
