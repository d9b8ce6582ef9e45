import dataclasses

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


SCHEMA = Schema(dense=("a", "b"), sparse=(SparseFeature("u", 20), SparseFeature("q", None, 2)),
                labels=("click", "conv"))
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


def _partly_masked(schema, seed):
  """A batch whose rows use 1 to max_len of their ids, so sum and mean pooling differ."""
  b = _batch(schema, seed=seed)
  mask = np.arange(schema.max_len)[None, None, :] < np.random.default_rng(seed).integers(
      1, schema.max_len + 1, (len(b.dense), schema.num_sparse, 1))
  return dataclasses.replace(b, sparse_mask=mask)


def test_dcnv2_call_pools_with_the_configured_combiner():
  """combiner="mean": __call__ (eval and serving) pools as the train step does, with
  pool(rows, mask, model.combiner) (jaxrec.training.step), not with the default sum."""
  schema = Schema(dense=("a",), sparse=(SparseFeature("u", 20, 3), SparseFeature("q", None, 3)), labels=("click",))
  m = build_model(schema, ModelConfig(dcnv2=DCNv2Config(embed_dim=4, top_mlp=(8,), combiner="mean")))
  assert m.combiner == "mean"
  b = _partly_masked(schema, seed=1)
  rows = m.embedding.gather(m.embedding.table[...], m.embedding.row_ids(jnp.asarray(b.sparse)))
  want = m.from_pooled(b.dense, pool(rows, b.sparse_mask, "mean"))
  np.testing.assert_allclose(m(b), want, rtol=1e-6)
  summed = m.from_pooled(b.dense, pool(rows, b.sparse_mask, "sum"))
  assert not np.allclose(summed, want)  # negative control: the batch tells the combiners apart


def test_dcnv2_x0_is_bottom_output_then_pooled_features():
  """x0 = [bottom(dense), pooled feature 0, ..., pooled feature Fs-1] (module docstring, the MLPerf
  DLRMv2 layout), through cross -> top -> heads. Both paths of test_dcnv2_shapes_and_paths_agree
  share from_pooled, so only this checks the order a checkpoint's cross / top weights rely on."""
  m = build_model(SCHEMA, ModelConfig(dcnv2=DCNv2Config(embed_dim=4, top_mlp=(8,))))
  b = _batch(SCHEMA, seed=2)
  pooled = jnp.asarray(np.random.default_rng(3).normal(size=(6, 2, 4)), jnp.float32)
  x0 = jnp.concatenate([m.bottom(jnp.asarray(b.dense, jnp.float32)), pooled.reshape(6, 8)], axis=1)
  np.testing.assert_allclose(m.from_pooled(b.dense, pooled), m.heads(m.top(m.cross(x0))), rtol=1e-6)
