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
