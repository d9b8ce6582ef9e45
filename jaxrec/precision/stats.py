"""Streaming statistics of GEMM operands for LoKA's Probe.

Activations: a Gaussian over the feature dimension, estimated by a batched Welford / Chan update
of the mean [F] and the sum of squared deviations [F, F] in f32, so the estimate from a stream of
batches equals the one from their concatenation (up to f32 rounding).

Weights: a matrix-normal W ~ MN(M, U, V) (U [K, K] among rows, V [N, N] among columns,
cov(vec W) = V kron U), estimated by the flip-flop algorithm (Dutilleul 1999):
    U <- sum_s (W_s - M) V^-1 (W_s - M)^T / (S N),   V <- sum_s (W_s - M)^T U^-1 (W_s - M) / (S K)
alternated to convergence, normalised so trace(U) = K (the factors are identifiable only up to
U c, V / c). `MatrixNormalEMA` tracks the factors of a weight that changes during training with an
exponential moving average of single-sample flip-flop updates, each scaled to the deviation it saw
(trace(U) trace(V) = ||W - M||^2, the matrix-normal's E||W - M||^2), so the sampled spread is the
weight's own movement and no prior outlives the data.
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


def _shape_inverse(a: jax.Array, ridge: float) -> jax.Array:
  """Inverse of `a` / mean(diag(a)) + ridge I: the flip-flop uses the other factor's shape
  only; a zero factor (no deviation seen yet) counts as the identity. For a matrix-normal d,
  E[d A d^T] = U trace(V A) is proportional to U for every A, so the ridge costs no bias, only the
  weighting's efficiency; it keeps the inverse well conditioned when the factor comes from fewer
  deviations than it has rows (rank-deficient), where a tiny ridge gave indefinite estimates."""
  level = jnp.trace(a) / a.shape[0]
  shape = jnp.where(level > 0, a / jnp.where(level > 0, level, 1.0), jnp.eye(a.shape[0], dtype=a.dtype))
  return jnp.linalg.inv(shape + ridge * jnp.eye(a.shape[0], dtype=a.dtype))


@struct.dataclass
class MatrixNormalEMA:
  """EMA estimates of a weight's matrix-normal factors as training changes it.

  `mean` is the EMA of the weight; U, V describe how it moves around that mean. Until a deviation
  has been seen V is 0 (samples are the mean itself); the first deviation sets U, V, later ones
  are averaged in with weight 1 - decay."""
  mean: jax.Array  # [K, N]
  u: jax.Array  # [K, K], trace K
  v: jax.Array  # [N, N], carries the scale: trace(U) trace(V) = E||W - M||^2
  decay: float = struct.field(pytree_node=False, default=0.9)

  @classmethod
  def init(cls, w: jax.Array, decay: float = 0.9) -> "MatrixNormalEMA":
    k, n = w.shape
    return cls(jnp.zeros((k, n), jnp.float32), jnp.eye(k, dtype=jnp.float32), jnp.zeros((n, n), jnp.float32), decay)

  def update(self, w: jax.Array, *, ridge: float = 0.1) -> "MatrixNormalEMA":
    """A stochastic flip-flop step: the new weight's deviation d from the EMA mean gives the shapes
    u ~ d V^-1 d^T and v ~ d^T U^-1 d against the current factors (one sample cannot identify both
    on its own; in expectation the fixed point is the batch flip-flop's), scaled so trace(u) = K and
    trace(u) trace(v) = ||d||^2; they are then averaged in (or taken as they are, the first time)."""
    k, n = w.shape
    w = w.astype(jnp.float32)
    d = w - self.mean
    u_new = d @ _shape_inverse(self.v, ridge) @ d.T
    v_new = d.T @ _shape_inverse(self.u, ridge) @ d
    # = d sym(A) d^T: drops the rounding asymmetry of the inverse and the products
    u_new, v_new = (u_new + u_new.T) / 2, (v_new + v_new.T) / 2
    energy = jnp.sum(d * d)
    tu, tv = jnp.trace(u_new), jnp.trace(v_new)
    moved = (energy > 0) & (tu > 0) & (tv > 0)
    u_new = jnp.where(moved, u_new * (k / jnp.where(moved, tu, 1.0)), self.u)
    v_new = jnp.where(moved, v_new * (energy / k / jnp.where(moved, tv, 1.0)), self.v)
    first = jnp.trace(self.v) <= 0
    a = self.decay
    u = jnp.where(first, u_new, a * self.u + (1 - a) * u_new)
    v = jnp.where(first, v_new, a * self.v + (1 - a) * v_new)
    return MatrixNormalEMA(a * self.mean + (1 - a) * w, u, v, self.decay)
