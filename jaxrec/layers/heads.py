"""Multi-task heads: one linear logit per objective over a shared representation.

h [B, d] -> logits f32 [B, T]. The final prediction layer keeps its bias and computes in f32
(LoKA keeps the last layer in high precision; calibration depends on it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MultiTaskHeads(nnx.Module):

  def __init__(self, in_features: int, num_tasks: int, *, rngs: nnx.Rngs):
    if num_tasks < 1:
      raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    self.proj = nnx.Linear(in_features, num_tasks, use_bias=True, dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.proj(h.astype(jnp.float32))
