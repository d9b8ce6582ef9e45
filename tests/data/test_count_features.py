"""Counting features: leak-free training counts, exact eval counts, clear errors."""

import numpy as np
import pytest

from jaxrec.data.batch import Schema, SparseFeature
from jaxrec.data.count_features import add_count_features
from jaxrec.data.errors import DataSpecError
from jaxrec.data.examples import Examples
from jaxrec.data.readers._common import one_hot_batch
from jaxrec.data.sources import DataConfig, open_train_eval

SCHEMA = Schema(dense=("d0",), sparse=(SparseFeature("user", 20), SparseFeature("item", 30),
                                       SparseFeature("tags", 5, max_len=3)), labels=("click", "conv"))


def make(n, seed):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.integers(0, 20, n), rng.integers(0, 30, n), rng.integers(0, 5, n)], 1)
  mask = np.ones_like(ids, bool)
  mask[rng.random(n) < 0.1, 1] = False  # some items missing
  labels = (rng.random((n, 2)) < 0.4).astype(np.float32)
  b = one_hot_batch(dense=rng.normal(size=(n, 1)), ids=ids, mask=mask, labels=labels, timestamp=np.arange(n))
  # tags is multi-valued in the schema: widen sparse to L = 3
  sparse = np.concatenate([b.sparse, np.zeros((n, 3, 2), np.int32)], 2)
  smask = np.concatenate([b.sparse_mask, np.zeros((n, 3, 2), bool)], 2)
  return Examples(SCHEMA, b.replace(sparse=sparse, sparse_mask=smask))


def brute(fit: Examples, rows: Examples, cols, task):
  """(positives, negatives) of each row's key among `fit`, by a Python loop."""
  def key(ex, i):
    return tuple(int(ex.data.sparse[i, j, 0]) if ex.data.sparse_mask[i, j, 0] else -1 for j in cols)
  table = {}
  for i in range(len(fit)):
    p, q = table.get(key(fit, i), (0.0, 0.0))
    y = fit.data.labels[i, task]
    table[key(fit, i)] = (p + y, q + 1 - y)
  return np.array([table.get(key(rows, i), (0.0, 0.0)) for i in range(len(rows))])


def test_eval_counts_are_exact_training_counts():
  train, evl = make(400, 0), make(150, 1)
  tr, ev = add_count_features(train, evl, ("user*item", "item"), folds=4)
  assert ev.schema.dense == ("d0", "count:user*item:click:pos", "count:user*item:click:neg",
                             "count:user*item:conv:pos", "count:user*item:conv:neg",
                             "count:item:click:pos", "count:item:click:neg", "count:item:conv:pos",
                             "count:item:conv:neg")
  np.testing.assert_array_equal(ev.data.dense[:, 0], evl.data.dense[:, 0])  # existing dense kept
  for c, (cols, task) in enumerate([((0, 1), 0), ((0, 1), 1), ((1,), 0), ((1,), 1)]):
    want = brute(train, evl, cols, task)
    np.testing.assert_allclose(np.expm1(ev.data.dense[:, 1 + 2 * c: 3 + 2 * c]), want, rtol=1e-5, atol=1e-5)
  assert tr.data.dense.shape == (400, 9) and tr.schema == ev.schema


def test_counts_are_weighted_and_padding_rows_count_nothing():
  """A row of weight w counts as w rows (weight 0 marks padding, which counts nothing): eval counts
  over weighted training rows equal those over the rows repeated w times."""
  train, evl = make(400, 0), make(150, 1)
  w = np.random.default_rng(5).integers(0, 3, len(train))  # 0, 1 or 2
  weighted = Examples(train.schema, train.data.replace(weights=w.astype(np.float32)))
  repeated = train.take(np.repeat(np.arange(len(train)), w))
  _, ev_w = add_count_features(weighted, evl, ("user*item",), folds=4)
  _, ev_r = add_count_features(repeated, evl, ("user*item",), folds=4)
  np.testing.assert_allclose(ev_w.data.dense, ev_r.data.dense, rtol=1e-6)
  _, ev_1 = add_count_features(train, evl, ("user*item",), folds=4)  # negative control: weights matter
  assert not np.allclose(ev_w.data.dense, ev_1.data.dense)


def test_training_counts_are_out_of_fold_so_a_row_never_counts_its_own_label():
  # every (user, item) key unique: out-of-fold counts of the cross must all be zero
  n = 300
  ids = np.stack([np.arange(n) % 20, np.arange(n) // 20], 1)
  labels = np.ones((n, 1), np.float32)
  schema = Schema(dense=(), sparse=(SparseFeature("user", 20), SparseFeature("item", 30)), labels=("click",))
  ex = Examples(schema, one_hot_batch(dense=np.zeros((n, 0)), ids=ids, mask=None, labels=labels,
                                      timestamp=np.arange(n)))
  tr, _ = add_count_features(ex, ex.take(np.arange(10)), ("user*item",), folds=5)
  assert np.all(tr.data.dense == 0.0)
  # the single feature `user` (15 rows each): out-of-fold counts are scaled to the full-data level
  tr, _ = add_count_features(ex, ex.take(np.arange(10)), ("user",), folds=5)
  pos = np.expm1(tr.data.dense[:, 0])
  assert abs(pos.mean() - 14.0) < 0.5  # expectation: the user's 14 other rows, not all 15


def test_out_of_fold_counts_are_full_counts_from_the_other_folds():
  train = make(300, 2)
  folds = 3
  tr, _ = add_count_features(train, make(10, 3), ("user",), folds=folds, seed=7)
  fold = np.random.default_rng([7, 0xC0]).integers(0, folds, len(train))
  for f in range(folds):
    m = np.flatnonzero(fold == f)
    want = brute(train.take(np.flatnonzero(fold != f)), train.take(m), (0,), 0) * folds / (folds - 1)
    np.testing.assert_allclose(np.expm1(tr.data.dense[m, 1:3]), want, rtol=1e-5, atol=1e-5)


def test_negative_control_in_sample_counts_differ():
  """Counting training rows in-sample (the leak) would give different numbers: the test above can fail."""
  train = make(300, 2)
  tr, _ = add_count_features(train, make(10, 3), ("user",), folds=3)
  assert not np.allclose(np.expm1(tr.data.dense[:, 1:3]), brute(train, train, (0,), 0), atol=1e-3)


@pytest.mark.parametrize("crosses,msg", [
    (("user*nope",), "no sparse feature 'nope'"),
    (("tags",), "only one-hot features"),
    (("user*user",), "names a feature twice"),
    (("user*",), "joined by '*'"),
    (("user", "user"), "repeat a cross"),
])
def test_bad_crosses_are_clear(crosses, msg):
  with pytest.raises(DataSpecError, match=msg):
    add_count_features(make(50, 0), make(10, 1), crosses)


def test_ads_world_refuses_count_features():
  with pytest.raises(DataSpecError, match="ads world is a stream"):
    open_train_eval(DataConfig(count_features=("user",)))


def test_config_rejects_one_fold():
  with pytest.raises(ValueError, match="count_folds"):
    DataConfig(count_features=("user",), count_folds=1)


def test_frappe_count_features_open(data_dir):
  cfg = DataConfig(train=f"libfm:{data_dir}/frappe/frappe.validation.libfm@train",
                   count_features=("user*item", "item*cost"))
  tr, ev = open_train_eval(cfg)
  assert tr.schema.dense == ev.schema.dense and len(tr.schema.dense) == 4
  assert len(tr) + len(ev) == 57722
  # every eval row whose (user, item) pair was in training with a positive has a positive count
  seen_pos = np.expm1(ev.examples.data.dense[:, 0]) > 0.5
  assert 0.15 < seen_pos.mean() < 0.35 and np.all(ev.examples.data.labels[seen_pos, 0] == 1)
