import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.layers import MLP, CrossLayer, CrossNetwork, MultiTaskHeads


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_mlp_matches_numpy():
  m = MLP(5, (7, 3), act="relu", final_activation=False, rngs=nnx.Rngs(0))
  x = _x((4, 5))
  h = np.maximum(np.asarray(x) @ np.asarray(m.layers[0].kernel[...]) + np.asarray(m.layers[0].bias[...]), 0)
  want = h @ np.asarray(m.layers[1].kernel[...]) + np.asarray(m.layers[1].bias[...])
  np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown activation"):
    MLP(5, (3,), act="swishy", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("rank", [None, 3])
def test_cross_layer_formula(rank):
  layer = CrossLayer(6, rank=rank, rngs=nnx.Rngs(1))
  x0, x = _x((4, 6), 1), _x((4, 6), 2)
  h = np.asarray(x) if rank is None else np.asarray(x) @ np.asarray(layer.u.kernel[...])
  wx = h @ np.asarray(layer.v.kernel[...]) + np.asarray(layer.v.bias[...])
  np.testing.assert_allclose(layer(x0, x), np.asarray(x0) * wx + np.asarray(x), rtol=1e-5, atol=1e-5)


def test_cross_network_is_not_linear():
  """Without biases, doubling x0 must not just double the output: the crosses are products."""
  net = CrossNetwork(4, 2, rngs=nnx.Rngs(3))
  for layer in net.layers:  # no biases: the network is then homogeneous in pieces of degree 1..3
    layer.v.bias[...] = jnp.zeros_like(layer.v.bias[...])
  x = _x((2, 4), 4)
  y1, y2 = np.asarray(net(x)), np.asarray(net(2 * x))
  assert not np.allclose(y2, 2 * y1)  # not linear: the crosses are real products


def test_heads_are_f32_per_task():
  h = MultiTaskHeads(8, 3, rngs=nnx.Rngs(0))
  out = h(_x((5, 8)).astype(jnp.bfloat16))
  assert out.shape == (5, 3) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="num_tasks"):
    MultiTaskHeads(8, 0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("rank", [None, 3])
def test_cross_network_crosses_every_layer_with_x0(rank):
  """x_{l+1} = x0 * (W x_l + b) + x_l: each layer multiplies by the network's input x0, not by its
  own input (feeding x_l in place of x0 still makes a non-linear network, so
  test_cross_network_is_not_linear cannot tell)."""
  net = CrossNetwork(6, 3, rank=rank, rngs=nnx.Rngs(5))
  for i, layer in enumerate(net.layers):  # non-zero biases, so they are part of the formula too
    layer.v.bias[...] = _x((6,), 10 + i)
  x0 = _x((4, 6), 6)
  x = np.asarray(x0, np.float64)
  for layer in net.layers:
    h = x if rank is None else x @ np.asarray(layer.u.kernel[...], np.float64)
    x = np.asarray(x0, np.float64) * (h @ np.asarray(layer.v.kernel[...], np.float64)
                                      + np.asarray(layer.v.bias[...], np.float64)) + x
  np.testing.assert_allclose(net(x0), x, rtol=1e-5, atol=1e-5)
