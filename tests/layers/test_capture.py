"""capture_gemm_operands: each GEMM site's input x and output gradient dy from one backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.layers import MLP
from jaxrec.layers.dense import capture_gemm_operands, dense_modules
from jaxrec.precision.plan import PrecisionPlan


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _mlp(plan=None, **kw):
  cfg = dict(act="relu", use_bias=True, norm="none", dtype=jnp.float32) | kw
  return MLP(12, (256, 256, 5), plan=plan, path="mlp", rngs=nnx.Rngs(0), **cfg)


def _kernel_grads(graphdef, state, loss):
  """d loss / d kernel per site, by plain autodiff."""
  g = jax.grad(lambda st: loss(nnx.merge(graphdef, st)))(state)
  return {name: m.kernel[...] for name, m in dense_modules(nnx.merge(graphdef, g))}


@pytest.mark.parametrize("kind", ["plain_f32", "mods_fp8_fused"])
def test_x_t_dy_is_the_kernel_gradient(kind):
  """dW = x.T @ dy at every site, so the captured (x, dy) are the GEMM operands autodiff uses."""
  if kind == "plain_f32":
    model = _mlp()
  else:  # no bias, BlockNorm + HardSwish fused into fp8 forward GEMMs (captured unfused)
    model = _mlp(PrecisionPlan.uniform("fp8_row"), act="hard_swish", use_bias=False, norm="block",
                 dtype=jnp.bfloat16)
  graphdef, state = nnx.split(model)
  x = _x((33, 12), 1)
  target = _x((33, 5), 2)
  loss = lambda m: jnp.mean((m(x).astype(jnp.float32) - target) ** 2)  # noqa: E731
  l, acts, dys = jax.jit(lambda st: capture_gemm_operands(nnx.merge(graphdef, st), loss))(state)
  want = _kernel_grads(graphdef, state, loss)
  assert set(acts) == set(dys) == set(want) == {"layers.0", "layers.1", "layers.2"}
  for s in want:
    assert dys[s].shape == (33, want[s].shape[1]) and float(jnp.max(jnp.abs(dys[s]))) > 0
    got = acts[s].astype(jnp.float32).T @ dys[s]
    if kind == "plain_f32":
      np.testing.assert_allclose(got, want[s], rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(want[s]))))
    else:  # autodiff ran fp8 wgrad GEMMs and bf16 rounding: same gradient within FP8's error
      rel = float(jnp.linalg.norm(got - want[s]) / jnp.linalg.norm(want[s]))
      assert rel < 0.1, (s, rel)
  assert np.isfinite(float(l))


def test_negative_control_a_wrong_site_is_not_the_gradient():
  model = _mlp()
  graphdef, state = nnx.split(model)
  x, target = _x((33, 12), 1), _x((33, 5), 2)
  loss = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
  _, acts, dys = jax.jit(lambda st: capture_gemm_operands(nnx.merge(graphdef, st), loss))(state)
  want = _kernel_grads(graphdef, state, loss)
  wrong = acts["layers.1"].T @ jnp.roll(dys["layers.1"], 1, axis=0)  # rows paired wrongly
  assert not np.allclose(wrong, want["layers.1"], rtol=1e-2, atol=1e-6)


def test_a_reused_model_keeps_no_taps():
  model = _mlp()
  x = _x((4, 12), 3)
  before = model(x)
  capture_gemm_operands(model, lambda m: jnp.sum(m(x)))
  assert not any(hasattr(m, "probe_tap") or hasattr(m, "probe_input") for _, m in dense_modules(model))
  np.testing.assert_array_equal(model(x), before)
