"""Dense (per-GEMM precision) and the MLP / cross network built from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.layers import MLP, CrossNetwork, Dense, block_norm, gemm_sites, plain_precision
from jaxrec.ops import planned_dense
from jaxrec.precision.plan import GemmChoice, PrecisionPlan, SitePrecision


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _grads(module, x):
  """(y, d sum(y^2)/dx, d/dparams) of a module, jitted."""
  graphdef, state = nnx.split(module)

  def f(state, x):
    y = nnx.merge(graphdef, state)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2), y

  (_, y), (gs, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x)
  return y, gx, nnx.to_pure_dict(gs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_is_nnx_linear(dtype, use_bias):
  """Same parameter tree and values (same rng draws), same output and gradients, bit for bit."""
  init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  lin = nnx.Linear(12, 5, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                   rngs=nnx.Rngs(3))
  den = Dense(12, 5, use_bias=use_bias, dtype=dtype, rngs=nnx.Rngs(3))
  p_lin, p_den = nnx.to_pure_dict(nnx.state(lin)), nnx.to_pure_dict(nnx.state(den))
  assert jax.tree.structure(p_lin) == jax.tree.structure(p_den)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), p_lin, p_den))
  if use_bias:  # a non-zero bias, so its gradient and addition are exercised
    lin.bias[...] = den.bias[...] = _x((5,), 9)
  x = _x((7, 12), 1, dtype)
  for a, b in zip(jax.tree.leaves(_grads(lin, x)), jax.tree.leaves(_grads(den, x))):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert den(_x((2, 3, 12), 2)).shape == (2, 3, 5)  # leading dimensions, as nnx.Linear


def test_dense_precision_default_and_plan():
  assert Dense(2, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)).precision == SitePrecision.uniform("bf16")
  assert Dense(2, 3, rngs=nnx.Rngs(0)).precision == plain_precision(jnp.float32) == SitePrecision.uniform("f32")
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    plain_precision(jnp.float16)
  site = SitePrecision(GemmChoice("fp8_row"), GemmChoice("bf16"), GemmChoice("fp8_block"))
  d = Dense(16, 8, precision=site, rngs=nnx.Rngs(0))
  x = _x((4, 16), 3)
  want = planned_dense(x, d.kernel[...], site) + d.bias[...]
  assert np.array_equal(d(x), want)


def test_dense_fuses_only_without_bias_and_with_fp8_forward():
  fp8 = SitePrecision.uniform("fp8_row")
  assert not Dense(8, 256, precision=fp8, rngs=nnx.Rngs(0)).fuses("block", "hard_swish")  # bias
  assert not Dense(8, 256, use_bias=False, rngs=nnx.Rngs(0)).fuses("block", "hard_swish")  # f32
  d = Dense(8, 256, use_bias=False, precision=fp8, rngs=nnx.Rngs(0))
  assert d.fuses("block", "hard_swish") and not d.fuses("block", "silu")
  x = _x((4, 8), 4)
  want = planned_dense(x, d.kernel[...], fp8, norm="block", activation="hard_swish")
  assert np.array_equal(d(x, norm="block", activation="hard_swish"), want)
  with pytest.raises(ValueError, match="cannot fuse"):
    Dense(8, 256, use_bias=False, rngs=nnx.Rngs(0))(x, norm="block", activation="hard_swish")


def test_site_names_are_module_paths():
  plan = PrecisionPlan(sites={"layers.1": SitePrecision.uniform("fp8_row")})
  mlp = MLP(6, (8, 4), plan=plan, rngs=nnx.Rngs(0))
  assert gemm_sites(mlp) == [("layers.0", 6, 8), ("layers.1", 8, 4)]
  assert mlp.layers[0].precision == plan.default and mlp.layers[1].precision == SitePrecision.uniform("fp8_row")
  net = CrossNetwork(6, 2, rank=3, plan=PrecisionPlan.uniform("fp8_block"), path="cross", rngs=nnx.Rngs(0))
  assert gemm_sites(net) == [("layers.0.u", 6, 3), ("layers.0.v", 3, 6), ("layers.1.u", 6, 3), ("layers.1.v", 3, 6)]
  assert all(layer.v.precision == SitePrecision.uniform("fp8_block") for layer in net.layers)


def test_mlp_layer_norm_is_the_baseline_block():
  """norm="layer": Dense -> LayerNorm (scale, and bias when use_bias) -> activation."""
  m = MLP(5, (8, 3), act="silu", norm="layer", rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(m))
  assert set(params["norms"][0]) == {"scale", "bias"}
  x = _x((4, 5), 5)
  h = x
  for i, layer in enumerate(m.layers):
    h = np.asarray(h) @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * np.asarray(m.norms[i].scale[...]) + np.asarray(m.norms[i].bias[...])
    h = h / (1 + np.exp(-h))
  np.testing.assert_allclose(m(x), h, rtol=1e-4, atol=1e-5)
  nobias = nnx.to_pure_dict(nnx.state(MLP(5, (8,), norm="layer", use_bias=False, rngs=nnx.Rngs(0))))
  assert set(nobias["norms"][0]) == {"scale"} and set(nobias["layers"][0]) == {"kernel"}
  with pytest.raises(ValueError, match="unknown norm"):
    MLP(5, (8,), norm="batch", rngs=nnx.Rngs(0))


def test_mlp_fuses_the_mods_where_the_plan_puts_fp8():
  """NoBias + BlockNorm + HardSwish under an fp8 forward: each hidden layer is one fused
  planned_dense; the last layer (no activation) and any layer with a bias are not fused."""
  plan = PrecisionPlan.uniform("fp8_row")
  x = _x((4, 16), 6)
  m = MLP(16, (256, 8), act="hard_swish", norm="block", use_bias=False, final_activation=False, plan=plan,
          rngs=nnx.Rngs(0))
  k0, k1 = m.layers[0].kernel[...], m.layers[1].kernel[...]
  h = planned_dense(x, k0, plan.default, norm="block", activation="hard_swish")
  assert np.array_equal(m(x), planned_dense(h, k1, plan.default))
  unfused = jax.nn.hard_swish(block_norm(planned_dense(x, k0, plan.default)))
  np.testing.assert_allclose(h, unfused, rtol=1e-5, atol=1e-6)
  biased = MLP(16, (256,), act="hard_swish", norm="block", plan=plan, rngs=nnx.Rngs(0))
  l0 = biased.layers[0]
  want = jax.nn.hard_swish(block_norm(planned_dense(x, l0.kernel[...], plan.default) + l0.bias[...]))
  assert np.array_equal(biased(x), want)
