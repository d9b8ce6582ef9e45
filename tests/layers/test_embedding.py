import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.data.batch import SparseFeature
from jaxrec.layers import FusedEmbedding, hash_ids, pool, table_configs


def _emb(row_multiple=1):
  feats = (SparseFeature("user", 7), SparseFeature("item", 5), SparseFeature("query", None, 3))
  cfgs = table_configs(feats, dim=4, hash_rows=11, max_rows_per_feature=100)
  return FusedEmbedding(cfgs, row_multiple=row_multiple, rngs=nnx.Rngs(0))


def test_rows_stay_inside_each_features_range():
  emb = _emb()
  rng = np.random.default_rng(0)
  sparse = np.stack([rng.integers(0, 7, (32, 3)), rng.integers(0, 5, (32, 3)),
                     rng.integers(0, 2**31 - 1, (32, 3))], axis=1).astype(np.int32)
  rows = np.asarray(emb.row_ids(jnp.asarray(sparse)))
  assert rows[:, 0].min() >= 0 and rows[:, 0].max() < 7
  assert rows[:, 1].min() >= 7 and rows[:, 1].max() < 12
  assert rows[:, 2].min() >= 12 and rows[:, 2].max() < 23
  np.testing.assert_array_equal(rows[:, 0], sparse[:, 0])  # direct ids pass through


def test_row_multiple_pads_table():
  assert _emb(row_multiple=8).num_rows == 24
  assert _emb().num_rows == 23


def test_hash_spreads_ids():
  h = np.asarray(hash_ids(jnp.arange(10000, dtype=jnp.int32)) % 64)
  counts = np.bincount(h, minlength=64)
  assert counts.min() > 100 and counts.max() < 220  # ~156 each


def test_pool_matches_numpy():
  rng = np.random.default_rng(1)
  rows = rng.normal(size=(4, 3, 5, 2)).astype(np.float32)
  mask = rng.uniform(size=(4, 3, 5)) > 0.4
  s = np.where(mask[..., None], rows, 0).sum(2)
  np.testing.assert_allclose(pool(rows, mask, "sum"), s, rtol=1e-6)
  np.testing.assert_allclose(pool(rows, mask, "mean"), s / np.maximum(mask.sum(-1, keepdims=True), 1), rtol=1e-6)
  with pytest.raises(ValueError, match="combiner"):
    pool(rows, mask, "max")


def test_call_equals_manual_lookup():
  emb = _emb()
  sparse = jnp.asarray(np.random.default_rng(2).integers(0, 5, (6, 3, 3)), jnp.int32)
  mask = jnp.ones((6, 3, 3), bool)
  table = np.asarray(emb.table[...])
  want = table[np.asarray(emb.row_ids(sparse))].sum(2)
  np.testing.assert_allclose(emb(sparse, mask), want, rtol=1e-6)


def test_mixed_dims_rejected():
  from jaxrec.layers import TableConfig
  with pytest.raises(ValueError, match="one embedding dim"):
    FusedEmbedding((TableConfig("a", 3, 4, False), TableConfig("b", 3, 8, False)), rngs=nnx.Rngs(0))


def _hash_numpy(ids):
  """hash_ids restated in numpy uint32 arithmetic (xorshift 16, Knuth's multiply, xorshift 15)."""
  x = ids.astype(np.uint32)
  x = x ^ (x >> np.uint32(16))
  x = (x.astype(np.uint64) * 0x9E3779B1 % 2**32).astype(np.uint32)
  return x ^ (x >> np.uint32(15))


def test_hashed_feature_rows_are_the_hash_modulo_its_rows_plus_its_offset():
  """A hashed feature's id goes to offset + hash_ids(id) % rows. The range check above also holds for
  ids % rows without the hash, which would put raw sequential or structured ids (Criteo's hashes
  included) into colliding rows and change every trained row assignment."""
  emb = _emb()
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 2**31 - 1, (16, 3)).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(hash_ids(jnp.asarray(ids))), _hash_numpy(ids))
  sparse = np.stack([np.zeros((16, 3)), np.zeros((16, 3)), ids], axis=1).astype(np.int32)
  rows = np.asarray(emb.row_ids(jnp.asarray(sparse)))
  assert emb.offsets[2] == 12 and emb.configs[2].num_rows == 11
  np.testing.assert_array_equal(rows[:, 2], (_hash_numpy(ids) % 11).astype(np.int64) + 12)
  assert not np.array_equal(rows[:, 2], ids % 11 + 12)  # negative control: the hash really mixes
