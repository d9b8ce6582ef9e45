"""Streaming statistics of GEMM operands for LoKA's Probe.

Activations: a Gaussian over the feature dimension, estimated by a batched Welford / Chan update
of the mean [F] and the sum of squared deviations [F, F] in f32, so the estimate from a stream of
batches equals the one from their concatenation (up to f32 rounding).

Weights: a matrix-normal W ~ MN(M, U, V) (U [K, K] among rows, V [N, N] among columns,
cov(vec W) = V kron U), estimated by the flip-flop algorithm (Dutilleul 1999):
    U <- sum_s (W_s - M) V^-1 (W_s - M)^T / (S N),   V <- sum_s (W_s - M)^T U^-1 (W_s - M) / (S K)
alternated to convergence, normalised so trace(U) = K (the factors are identifiable only up to
U c, V / c). `MatrixNormalEMA` tracks the factors of a weight that changes during training with an
exponential moving average of single-sample flip-flop updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Welford:
  count: jax.Array  # f32 []
  mean: jax.Array  # f32 [F]
  m2: jax.Array  # f32 [F, F], sum of outer products of deviations

  @classmethod
  def init(cls, features: int) -> "Welford":
    return cls(jnp.zeros((), jnp.float32), jnp.zeros((features,), jnp.float32),
               jnp.zeros((features, features), jnp.float32))

  def update(self, x: jax.Array) -> "Welford":
    """Merges a batch x [B, F] (Chan et al.'s parallel update)."""
    x = x.astype(jnp.float32).reshape(-1, self.mean.shape[0])
    nb = jnp.asarray(x.shape[0], jnp.float32)
    mb = jnp.mean(x, axis=0)
    d = x - mb
    m2b = d.T @ d
    n = self.count + nb
    delta = mb - self.mean
    mean = self.mean + delta * (nb / n)
    m2 = self.m2 + m2b + jnp.outer(delta, delta) * (self.count * nb / n)
    return Welford(n, mean, m2)

  def covariance(self) -> jax.Array:
    """Unbiased covariance [F, F] (needs count >= 2)."""
    return self.m2 / jnp.maximum(self.count - 1.0, 1.0)


def _normalise(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  c = jnp.trace(u) / u.shape[0]
  return u / c, v * c


def flip_flop(samples: jax.Array, *, iters: int = 30, ridge: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(M [K, N], U [K, K], V [N, N]) of a matrix-normal from samples [S, K, N]."""
  s, k, n = samples.shape
  w = samples.astype(jnp.float32)
  m = jnp.mean(w, axis=0)
  d = w - m
  u, v = jnp.eye(k, dtype=jnp.float32), jnp.eye(n, dtype=jnp.float32)

  def body(_, uv):
    u, v = uv
    vi = jnp.linalg.inv(v + ridge * jnp.eye(n))
    u = jnp.einsum("skn,nm,sjm->kj", d, vi, d) / (s * n)
    ui = jnp.linalg.inv(u + ridge * jnp.eye(k))
    v = jnp.einsum("skn,kj,sjm->nm", d, ui, d) / (s * k)
    return _normalise(u, v)

  u, v = jax.lax.fori_loop(0, iters, body, (u, v))
  return m, u, v


@struct.dataclass
class MatrixNormalEMA:
  """EMA estimates of a weight's matrix-normal factors as training changes it."""
  mean: jax.Array  # [K, N]
  u: jax.Array  # [K, K]
  v: jax.Array  # [N, N]
  decay: float = struct.field(pytree_node=False, default=0.9)

  @classmethod
  def init(cls, w: jax.Array, decay: float = 0.9) -> "MatrixNormalEMA":
    k, n = w.shape
    return cls(jnp.zeros((k, n), jnp.float32), jnp.eye(k, dtype=jnp.float32), jnp.eye(n, dtype=jnp.float32), decay)

  def update(self, w: jax.Array, *, ridge: float = 1e-6) -> "MatrixNormalEMA":
    """A stochastic flip-flop step: the new weight's deviation d from the EMA mean gives
    u = d V^-1 d^T / N and v = d^T U^-1 d / K against the current EMA factors (one sample cannot
    identify both factors on its own), which are then averaged in. In expectation the fixed point
    is the batch flip-flop's: E[d V^-1 d^T] / N = U when V is right."""
    k, n = w.shape
    w = w.astype(jnp.float32)
    d = w - self.mean
    u_new = d @ jnp.linalg.inv(self.v + ridge * jnp.eye(n)) @ d.T / n
    v_new = d.T @ jnp.linalg.inv(self.u + ridge * jnp.eye(k)) @ d / k
    u_new, v_new = _normalise(u_new, v_new)
    a = self.decay
    u, v = _normalise(a * self.u + (1 - a) * u_new, a * self.v + (1 - a) * v_new)
    return MatrixNormalEMA(a * self.mean + (1 - a) * w, u, v, self.decay)
