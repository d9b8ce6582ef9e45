import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data.batch import Schema, SparseFeature, batch_from_numpy
from jaxrec.layers import pool
from jaxrec.models import DCNv2Config, LogRegConfig, ModelConfig, build_model


def _batch(schema, b=6, seed=0):
  rng = np.random.default_rng(seed)
  sparse = np.stack([rng.integers(0, f.vocab_size or 10**6, (b, schema.max_len)) for f in schema.sparse], 1)
  return batch_from_numpy(dense=rng.normal(size=(b, schema.num_dense)), sparse=sparse,
                          sparse_mask=np.ones(sparse.shape, bool), labels=np.zeros((b, schema.num_tasks)),
                          weights=np.ones(b), domain=np.zeros(b), timestamp=np.zeros(b))


SCHEMA = Schema(dense=("a", "b"), sparse=(SparseFeature("u", 20), SparseFeature("q", None, 2)), labels=("click", "conv"))
NO_DENSE = Schema(dense=(), sparse=(SparseFeature("u", 20), SparseFeature("i", 30)), labels=("click",))


@pytest.mark.parametrize("schema", [SCHEMA, NO_DENSE])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dcnv2_shapes_and_paths_agree(schema, dtype):
  m = build_model(schema, ModelConfig(dcnv2=DCNv2Config(embed_dim=4, top_mlp=(8,), compute_dtype=dtype)))
  b = _batch(schema)
  logits = m(b)
  assert logits.shape == (6, schema.num_tasks) and logits.dtype == jnp.float32
  rows = m.embedding.gather(m.embedding.table[...], m.embedding.row_ids(jnp.asarray(b.sparse)))
  np.testing.assert_allclose(m.from_pooled(b.dense, pool(rows, b.sparse_mask)), logits, rtol=1e-6)


def test_logreg_is_additive():
  m = build_model(SCHEMA, ModelConfig(kind="logreg", logreg=LogRegConfig()))
  b = _batch(SCHEMA)
  table = np.asarray(m.embedding.table[...])
  ids = np.asarray(m.embedding.row_ids(jnp.asarray(b.sparse)))
  want = (table[ids].sum((1, 2)) + b.dense @ np.asarray(m.linear.kernel[...]) + np.asarray(m.linear.bias[...]))
  np.testing.assert_allclose(m(b), want, rtol=1e-5, atol=1e-6)


def test_unknown_model_kind():
  with pytest.raises(ValueError, match="unknown model kind"):
    build_model(SCHEMA, ModelConfig(kind="transformer"))  # type: ignore[arg-type]
