"""weighted_bce against a float64 numpy reference: values, gradients (at z = 0 too), weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.training.losses import weighted_bce


def _reference(z, y, w):
  z, y, w = (np.asarray(a, np.float64) for a in (z, y, w))
  per = np.logaddexp(0.0, z) - z * y
  loss = (per.sum(-1) * w).sum() / (w.sum() if w.sum() > 0 else 1.0)
  grad = (1 / (1 + np.exp(-z)) - y) * w[:, None] / (w.sum() if w.sum() > 0 else 1.0)
  return loss, grad


@pytest.mark.parametrize("weights", [[1, 1, 0, 2], [0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0]])
def test_value_and_gradient_match_the_reference(weights):
  z = np.array([[0.0, 3.0], [-2.5, 0.0], [100.0, -100.0], [1e4, -0.3]], np.float32)
  y = np.array([[0, 1], [1, 0], [1, 0], [0, 1]], np.float32)
  w = np.array(weights, np.float32)
  loss, grad = jax.value_and_grad(weighted_bce)(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w))
  want_loss, want_grad = _reference(z, y, w)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
  assert np.isfinite(np.asarray(grad)).all()


def test_gradient_at_a_zero_logit_is_sigmoid_minus_label():
  """A zero-initialised model (the logistic regression) starts every row at z = 0: the gradient
  there is 1/2 - y (the former form gave -y, so negatives pulled nothing and the bias moved the
  wrong way on the first step)."""
  grad = jax.grad(weighted_bce)(jnp.zeros((4, 1)), jnp.array([[0.0], [0.0], [0.0], [1.0]]), jnp.ones(4))
  np.testing.assert_allclose(np.asarray(grad)[:, 0], [0.125, 0.125, 0.125, -0.125])


def test_fractional_weights_are_a_weighted_mean():
  """Weights summing below 1 (after negative down-sampling, say) still average: the divisor was max(sum, 1)."""
  z, y = jnp.full((4, 1), 0.7), jnp.zeros((4, 1))
  full = weighted_bce(z, y, jnp.ones(4))
  assert float(weighted_bce(z, y, jnp.full(4, 0.1))) == pytest.approx(float(full), rel=1e-6)
