"""Counting features: how often a value (or a cross of values) was seen with each label in training.

The counter features of production ads rankers ("this user clicked this advertiser 3 times, and
saw it 40 times without a click"), computed offline from the training split. For a cross
`user*item` and each objective t, every row gets two dense features,

    count:user*item:t:pos = log1p(#training rows with the same (user, item) and label_t = 1)
    count:user*item:t:neg = log1p(#training rows with the same (user, item) and label_t = 0)

Leakage: a training row must not count its own label, so training rows get out-of-fold counts
(rows are split into `folds` seeded folds; a row's counts come from the other folds, scaled by
folds / (folds - 1) so they match the full-data counts in expectation). Eval rows get counts from
all training rows and never from eval rows. Values never seen in training count 0.

Only one-hot features (max_len 1) can be crossed; a missing (masked) value is its own value.
Counts need a finite training set held in memory (Examples), so they do not apply to the
streaming ads world.

>>> import numpy as np
>>> from jaxrec.data.batch import Schema, SparseFeature
>>> from jaxrec.data.readers._common import one_hot_batch
>>> schema = Schema(dense=(), sparse=(SparseFeature("user", 3), SparseFeature("item", 3)), labels=("click",))
>>> ids = np.array([[0, 1], [0, 1], [1, 2], [2, 2]])
>>> rows = lambda ids, y: Examples(schema, one_hot_batch(dense=np.zeros((len(y), 0)), ids=ids, mask=None,
...                                                     labels=np.array(y, np.float32)[:, None],
...                                                     timestamp=np.arange(len(y))))
>>> train, evl = rows(ids, [1, 1, 0, 1]), rows(np.array([[0, 1], [1, 1]]), [1, 0])
>>> _, ev = add_count_features(train, evl, ("user*item",), folds=2)
>>> ev.schema.dense
('count:user*item:click:pos', 'count:user*item:click:neg')
>>> np.expm1(ev.data.dense).round(3).tolist()  # (0, 1) seen twice with a click; (1, 1) never
[[2.0, 0.0], [0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data.batch import Schema
from jaxrec.data.errors import DataSpecError
from jaxrec.data.examples import Examples


def parse_crosses(crosses: tuple[str, ...], schema: Schema) -> list[tuple[int, ...]]:
  """`("user*item", "item")` -> sparse feature indices; raises DataSpecError naming a bad entry."""
  names = {f.name: j for j, f in enumerate(schema.sparse)}
  out = []
  for cross in crosses:
    parts = [p.strip() for p in cross.split("*")]
    if not cross.strip() or any(not p for p in parts):
      raise DataSpecError(f"count feature {cross!r}: write sparse feature names joined by '*', e.g. user*item")
    for p in parts:
      if p not in names:
        raise DataSpecError(f"count feature {cross!r}: no sparse feature {p!r}; the data has {', '.join(names)}")
      if schema.sparse[names[p]].max_len != 1:
        raise DataSpecError(f"count feature {cross!r}: {p!r} holds up to {schema.sparse[names[p]].max_len} "
                            "ids per row; only one-hot features can be counted")
    if len(set(parts)) != len(parts):
      raise DataSpecError(f"count feature {cross!r} names a feature twice")
    out.append(tuple(names[p] for p in parts))
  if len(set(out)) != len(out):
    raise DataSpecError(f"count features {crosses} repeat a cross")
  return out


def _keys(ex: Examples, cross: tuple[int, ...]) -> np.ndarray:
  """One int64 key per row for the cross (ids as columns of a structured row; -1 = missing)."""
  cols = [np.where(ex.data.sparse_mask[:, j, 0], ex.data.sparse[:, j, 0].astype(np.int64), -1) for j in cross]
  stacked = np.ascontiguousarray(np.stack(cols, 1))
  return stacked.view(np.dtype((np.void, stacked.dtype.itemsize * stacked.shape[1]))).ravel()


def _counts(fit_keys: np.ndarray, fit_labels: np.ndarray, fit_w: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[len(keys), T, 2] (positives, negatives) of each key among the fit rows (weighted)."""
  uniq, inv = np.unique(fit_keys, return_inverse=True)
  t = fit_labels.shape[1]
  out = np.zeros((len(keys), t, 2), np.float64)
  if len(uniq) == 0:
    return out
  idx = np.clip(np.searchsorted(uniq, keys), 0, len(uniq) - 1)
  hit = uniq[idx] == keys
  for k in range(t):
    pos = np.bincount(inv, weights=fit_w * fit_labels[:, k], minlength=len(uniq))
    neg = np.bincount(inv, weights=fit_w * (1.0 - fit_labels[:, k]), minlength=len(uniq))
    out[:, k, 0] = np.where(hit, pos[idx], 0.0)
    out[:, k, 1] = np.where(hit, neg[idx], 0.0)
  return out


def _with_dense(ex: Examples, extra: np.ndarray, names: tuple[str, ...]) -> Examples:
  schema = dataclasses.replace(ex.schema, dense=ex.schema.dense + names)
  data = ex.data.replace(dense=np.concatenate([ex.data.dense, extra.astype(np.float32)], 1))
  return Examples(schema, data, ex.source)


def add_count_features(train: Examples, evl: Examples, crosses: tuple[str, ...], *, folds: int = 5,
                       seed: int = 0) -> tuple[Examples, Examples]:
  """Appends log1p positive/negative counts of each cross to the dense features of both splits.

  Training rows get out-of-fold counts (`folds` seeded folds), eval rows counts over all training
  rows. Returns new Examples; the inputs are unchanged. See the module docstring.
  """
  if not crosses:
    return train, evl
  if folds < 2:
    raise DataSpecError(f"count features need at least 2 folds for leak-free training counts, got {folds}")
  cols = parse_crosses(crosses, train.schema)
  parse_crosses(crosses, evl.schema)  # same names must exist in eval (schemas are checked equal later)
  fold = np.random.default_rng([seed, 0xC0]).integers(0, folds, len(train))
  y, w = train.data.labels.astype(np.float64), train.data.weights.astype(np.float64)
  tr_parts, ev_parts, names = [], [], []
  for cross, spec in zip(cols, crosses):
    ktr, kev = _keys(train, cross), _keys(evl, cross)
    c_tr = np.zeros((len(train), y.shape[1], 2))
    for f in range(folds):
      m = fold == f
      c_tr[m] = _counts(ktr[~m], y[~m], w[~m], ktr[m]) * (folds / (folds - 1))
    c_ev = _counts(ktr, y, w, kev)
    tr_parts.append(np.log1p(c_tr).reshape(len(train), -1))
    ev_parts.append(np.log1p(c_ev).reshape(len(evl), -1))
    label = "*".join(p.strip() for p in spec.split("*"))
    names += [f"count:{label}:{task}:{kind}" for task in train.schema.labels for kind in ("pos", "neg")]
  names_t = tuple(names)
  return (_with_dense(train, np.concatenate(tr_parts, 1), names_t),
          _with_dense(evl, np.concatenate(ev_parts, 1), names_t))
