"""Weighted binary cross-entropy over several objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over weighted examples of the sum over tasks of BCE-with-logits.

  logits, labels f32 [B, T]; weights f32 [B] (0 = padding; any non-negative weights, fractional ones
  too). Returns a scalar: sum(w * loss) / sum(w), and 0 for a batch of padding only.

  softplus(z) - z y is BCE-with-logits, stable for any |z|, with the gradient sigmoid(z) - y
  everywhere (the max(z, 0) + log1p(exp(-|z|)) form has -y at z = 0 exactly: JAX's derivative of
  |z| there is 1 and of max(z, 0) is 1/2, and a zero-initialised model starts there).
  """
  logits = logits.astype(jnp.float32)
  per = jax.nn.softplus(logits) - logits * labels
  total = jnp.sum(weights)
  return jnp.sum(per.sum(-1) * weights) / jnp.where(total > 0, total, 1.0)
