import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.precision.stats import MatrixNormalEMA, Welford, flip_flop


def test_streaming_welford_matches_batch_estimates():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(8, 8))
  batches = [rng.normal(size=(int(rng.integers(1, 50)), 8)) @ a + 3.0 for _ in range(20)]
  st = Welford.init(8)
  update = jax.jit(lambda s, x: s.update(x))
  for b in batches:
    st = update(st, jnp.asarray(b, jnp.float32))
  allx = np.concatenate(batches)
  assert int(st.count) == len(allx)
  np.testing.assert_allclose(st.mean, allx.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(st.covariance(), np.cov(allx, rowvar=False), rtol=1e-3, atol=1e-3)


def _spd(k, seed):
  r = np.random.default_rng(seed).normal(size=(k, k))
  return r @ r.T / k + 0.5 * np.eye(k)


def _kron_err(u, v, u0, v0):
  a, b = np.kron(np.asarray(v), np.asarray(u)), np.kron(v0, u0)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _samples(u0, v0, s, seed, mean=None):
  rng = np.random.default_rng(seed)
  lu, lv = np.linalg.cholesky(u0), np.linalg.cholesky(v0)
  z = rng.normal(size=(s, u0.shape[0], v0.shape[0]))
  w = np.einsum("ij,sjk,lk->sil", lu, z, lv)
  return w + (0 if mean is None else mean)


def test_flip_flop_recovers_known_factors():
  u0, v0 = _spd(6, 1), _spd(5, 2)
  w = _samples(u0, v0, 2000, 3, mean=np.arange(30.0).reshape(6, 5))
  m, u, v = flip_flop(jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(m, np.arange(30.0).reshape(6, 5), atol=0.15)
  assert _kron_err(u, v, u0, v0) < 0.06  # measured 0.028
  assert float(jnp.trace(u)) == pytest.approx(6.0, rel=1e-4)
  # negative control: identity factors are far from the truth
  assert _kron_err(np.eye(6), np.eye(5), u0, v0) > 0.3


def test_ema_tracks_factors_of_a_stream_of_weights():
  u0, v0 = _spd(6, 4), _spd(5, 5)
  w = _samples(u0, v0, 600, 6)
  st = MatrixNormalEMA.init(jnp.zeros((6, 5)), decay=0.99)
  update = jax.jit(lambda s, x: s.update(x))
  for x in w:
    st = update(st, jnp.asarray(x, jnp.float32))
  assert _kron_err(st.u, st.v, u0, v0) < 0.2  # measured 0.12; identity factors: 0.83
  assert _kron_err(st.u, st.v, u0, v0) < _kron_err(np.eye(6), np.eye(5), u0, v0)


def test_ema_factors_carry_the_weights_own_scale():
  """Weights move by ~1e-3 per step, far below N(0, 1): the factors must take that scale from the
  deviations, not keep an identity prior (which made sampled weights 8x the trained ones' size)."""
  u0, v0 = _spd(6, 4), _spd(5, 5)
  scale = 1e-3
  w = _samples(u0, v0, 600, 6) * scale
  st = MatrixNormalEMA.init(jnp.zeros((6, 5)), decay=0.99)
  update = jax.jit(lambda s, x: s.update(x))
  for x in w:
    st = update(st, jnp.asarray(x, jnp.float32))
  assert _kron_err(st.u, st.v, u0, v0 * scale**2) < 0.2  # scale included; measured 0.12
  assert float(jnp.trace(st.u)) == pytest.approx(6.0, rel=1e-4)


def test_ema_samples_stay_near_a_slowly_moving_weight():
  """A trained-looking weight (entries ~0.05) drifting slowly, seen 8 times as the Probe sees it:
  the matrix-normal's spread is the drift's size, so its samples look like the weight."""
  from jaxrec.precision.error_model import MatrixNormal, sample_matrix_normal
  rng = np.random.default_rng(0)
  w = rng.normal(scale=0.05, size=(12, 8)).astype(np.float32)
  st = MatrixNormalEMA(jnp.asarray(w), jnp.eye(12), jnp.zeros((8, 8)), 0.9)  # the Probe's first update
  seen = []
  for _ in range(7):
    w = w + rng.normal(scale=5e-4, size=w.shape).astype(np.float32)
    seen.append(float(np.sum((w - np.asarray(st.mean)) ** 2)))
    st = st.update(jnp.asarray(w))
  assert float(jnp.trace(st.u) * jnp.trace(st.v)) == pytest.approx(np.mean(seen), rel=0.5)
  samples = np.asarray(sample_matrix_normal(jax.random.key(0), MatrixNormal.from_ema(st), 16))
  rel = np.linalg.norm(samples - w, axis=(1, 2)) / np.linalg.norm(w)
  assert rel.max() < 0.1, rel  # measured 0.021-0.028


def test_ema_factors_from_low_rank_moves_stay_factorable():
  """Training moves a weight by sums of a few outer products (one per example's gradient), so the
  deviations the Probe sees are nearly low-rank and a factor estimated from them is ill
  conditioned. The factors must stay PSD enough to sample from: with a 1e-6 ridge on the shape
  inverse they came out indefinite (min eigenvalue -6.7x the mean diagonal here, and 'not positive
  semi-definite even with jitter 0.01' on the ads world's 160 x 160 cross layers)."""
  from jaxrec.precision.error_model import MatrixNormal, sample_matrix_normal
  rng = np.random.default_rng(1)
  k = n = 160
  w = rng.normal(scale=0.05, size=(k, n)).astype(np.float32)
  st = MatrixNormalEMA(jnp.asarray(w), jnp.eye(k), jnp.zeros((n, n)), 0.9)  # the Probe's first update
  update = jax.jit(lambda s, x: s.update(x))
  for _ in range(7):
    step = sum(np.outer(rng.normal(size=k), rng.normal(size=n)) * 10.0 ** -rng.uniform(2, 5) for _ in range(12))
    w = (w + 1e-2 * step / np.linalg.norm(step) * np.linalg.norm(w)).astype(np.float32)
    st = update(st, jnp.asarray(w))
  for f in (st.u, st.v):
    assert np.linalg.eigvalsh(np.asarray(f, np.float64)).min() > -1e-4 * float(jnp.trace(f)) / f.shape[0]
  samples = np.asarray(sample_matrix_normal(jax.random.key(0), MatrixNormal.from_ema(st), 4))
  assert np.isfinite(samples).all()
  assert (np.linalg.norm(samples - w, axis=(1, 2)) / np.linalg.norm(w)).max() < 0.1  # measured 0.024
