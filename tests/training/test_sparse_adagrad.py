import jax
import numpy as np
import pytest

from jaxrec.training.sparse_adagrad import dense_rowwise_adagrad, sparse_rowwise_adagrad


def _case(seed, rows=50, dim=8, n=64):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(rows, dim)).astype(np.float32)
  acc = rng.uniform(0, 1, size=rows).astype(np.float32)
  ids = rng.integers(0, rows // 3, size=n).astype(np.int32)  # many duplicates
  g = rng.normal(size=(n, dim)).astype(np.float32)
  mask = rng.uniform(size=n) > 0.2
  return table, acc, ids, g, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_matches_dense_reference(seed):
  table, acc, ids, g, mask = _case(seed)
  dense_g = np.zeros_like(table)
  np.add.at(dense_g, ids[mask], g[mask])
  want_t, want_a = dense_rowwise_adagrad(table, acc, dense_g, lr=0.1)
  got_t, got_a = jax.jit(lambda *a: sparse_rowwise_adagrad(*a, lr=0.1))(table, acc, ids, g, mask)
  np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-6)


def test_untouched_and_masked_rows_unchanged():
  table, acc, ids, g, mask = _case(3)
  got_t, got_a = sparse_rowwise_adagrad(table, acc, ids, g, mask, lr=0.1)
  untouched = np.setdiff1d(np.arange(table.shape[0]), ids[mask])
  np.testing.assert_array_equal(np.asarray(got_t)[untouched], table[untouched])
  np.testing.assert_array_equal(np.asarray(got_a)[untouched], acc[untouched])


def test_duplicates_are_summed_not_overwritten():
  table = np.ones((4, 2), np.float32)
  acc = np.zeros(4, np.float32)
  ids = np.array([1, 1, 1], np.int32)
  g = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
  got_t, got_a = sparse_rowwise_adagrad(table, acc, ids, g, np.ones(3, bool), lr=1.0, eps=0.0)
  # summed gradient [3, 0]: acc = mean([9, 0]) = 4.5, step = 3 / sqrt(4.5)
  assert float(got_a[1]) == pytest.approx(4.5)
  assert float(got_t[1, 0]) == pytest.approx(1.0 - 3.0 / np.sqrt(4.5), rel=1e-6)


def test_negative_control_wrong_grad_detected():
  table, acc, ids, g, mask = _case(4)
  dense_g = np.zeros_like(table)
  np.add.at(dense_g, ids[mask], g[mask])
  want_t, _ = dense_rowwise_adagrad(table, acc, dense_g, lr=0.1)
  got_t, _ = sparse_rowwise_adagrad(table, acc, ids, -g, mask, lr=0.1)
  assert not np.allclose(got_t, want_t, rtol=1e-5, atol=1e-6)


def test_strict_dtype_promotion_clean():
  table, acc, ids, g, mask = _case(5)
  with jax.numpy_dtype_promotion("strict"):
    sparse_rowwise_adagrad(table, acc, ids, g, mask, lr=0.1)
