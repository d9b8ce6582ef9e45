"""Weighted binary cross-entropy over several objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over weighted examples of the sum over tasks of BCE-with-logits.

  logits, labels f32 [B, T]; weights f32 [B] (0 = padding). Returns a scalar.
  """
  logits = logits.astype(jnp.float32)
  per = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(per.sum(-1) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
