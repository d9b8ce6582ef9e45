"""LoKA's model Mods: BlockNorm, NoBias, HardSwish as config switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.data.batch import Schema, SparseFeature, batch_from_numpy
from jaxrec.layers import MLP, block_norm
from jaxrec.models import DCNv2Config, ModelConfig, build_model


def test_block_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32) * 7
  xb = x.reshape(3, 2, 256)
  want = (xb / np.sqrt((xb ** 2).mean(-1, keepdims=True) + 1e-6)).reshape(3, 512)
  np.testing.assert_allclose(block_norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
  small = jnp.asarray(x[:, :64])  # narrower than a block: one block of the whole width
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(block_norm(small) ** 2, -1)), np.ones(3), rtol=1e-4)
  with pytest.raises(ValueError, match="not a multiple of the block"):
    block_norm(jnp.ones((2, 300)))


def test_mlp_block_norm_width_checked():
  with pytest.raises(ValueError, match="multiples of 256"):
    MLP(8, (384, 16), norm="block", rngs=nnx.Rngs(0))
  m = MLP(8, (512, 16), norm="block", act="hard_swish", rngs=nnx.Rngs(0))
  assert m(jnp.ones((2, 8))).shape == (2, 16)


def test_nobias_keeps_only_the_head_bias():
  schema = Schema(dense=("a",), sparse=(SparseFeature("u", 10),), labels=("click",))
  cfg = ModelConfig(dcnv2=DCNv2Config(embed_dim=8, bottom_mlp=(16,), top_mlp=(256, 64), use_bias=False,
                                      block_norm=True, activation="hard_swish"))
  m = build_model(schema, cfg)
  paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(m)))]
  paths = [p.replace("'", "").replace("[", "").replace("]", "") for p in paths]
  biases = [p for p in paths if "bias" in p]
  assert biases and all(p.startswith("heads") for p in biases), biases
  b = batch_from_numpy(dense=np.ones((4, 1)), sparse=np.zeros((4, 1, 1)), sparse_mask=np.ones((4, 1, 1)),
                       labels=np.zeros((4, 1)), weights=np.ones(4), domain=np.zeros(4), timestamp=np.zeros(4))
  assert np.all(np.isfinite(np.asarray(m(b))))
