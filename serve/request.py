"""Ranking requests: the typed request, its validation, and its rows in the model's layout.

A request is one user with request-level features and N candidates. Each candidate becomes one
row of the model's Batch; the request's features are repeated on every row and a candidate's own
features override them. Feature names are the schema's dense and sparse feature names.

    dense        f32  [N, Fd]     a missing dense feature is 0.0 (the sources' normalised mean)
    sparse       i32  [N, Fs, L]  an id (int) or up to max_len ids (list[int]) per sparse feature
    sparse_mask  bool [N, Fs, L]  False for padding and for a missing sparse feature

>>> from jaxrec.data.batch import Schema, SparseFeature
>>> schema = Schema(dense=("price",), sparse=(SparseFeature("ad", 10),), labels=("click",))
>>> rows = encode_request(RankRequest({"price": 0.5}, [{"ad": 3}, {"ad": 7, "price": 1.0}]), schema,
...                       max_candidates=8)
>>> rows.dense[:, 0].tolist(), rows.sparse[:, 0, 0].tolist()
([0.5, 1.0], [3, 7])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import numpy as np

from jaxrec.data.batch import Schema

FeatureValue = Union[int, float, list[int]]
MAX_HASHED_ID = 2**31 - 1  # ids of hashed features (vocab_size None) must fit in int32


class RequestError(ValueError):
  """A request the engine cannot score; the message names the offending field (HTTP 4xx)."""


MAX_USER_ID = 2**63 - 1  # user ids key the user-embedding cache as int64


@dataclasses.dataclass(frozen=True)
class RankRequest:
  """One user's request: `features` shared by every candidate, and one feature dict per candidate.

  `user_id` (int in [0, 2**63)) keys the user-embedding cache of a ranker that consumes a user
  model's embedding (required there, ignored otherwise). It is the cache key only: the user tower
  reads its own features (user_id, user_segment, user_activity, hist_*) from `features`.
  """

  features: dict[str, FeatureValue]
  candidates: list[dict[str, FeatureValue]]
  user_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Rows:
  """A request's model rows (host numpy arrays, shapes in the module docstring)."""

  dense: np.ndarray
  sparse: np.ndarray
  sparse_mask: np.ndarray

  @property
  def num_rows(self) -> int:
    return self.dense.shape[0]


def empty_rows(n: int, schema: Schema) -> Rows:
  """n padding rows: zero dense features, no sparse ids."""
  return Rows(dense=np.zeros((n, schema.num_dense), np.float32),
              sparse=np.zeros((n, schema.num_sparse, schema.max_len), np.int32),
              sparse_mask=np.zeros((n, schema.num_sparse, schema.max_len), np.bool_))


def concat_rows(parts: list[Rows], schema: Schema, total: int) -> Rows:
  """The parts' rows one after another, padded with `empty_rows` up to `total` rows."""
  n = sum(p.num_rows for p in parts)
  if n > total:
    raise ValueError(f"{n} rows do not fit in {total}")
  pad = empty_rows(total - n, schema)
  return Rows(dense=np.concatenate([p.dense for p in parts] + [pad.dense]),
              sparse=np.concatenate([p.sparse for p in parts] + [pad.sparse]),
              sparse_mask=np.concatenate([p.sparse_mask for p in parts] + [pad.sparse_mask]))


def encode_request(req: RankRequest, schema: Schema, *, max_candidates: int, require_user_id: bool = False,
                   server_filled: frozenset[str] = frozenset(), user_features: frozenset[str] = frozenset()) -> Rows:
  """Validates `req` against `schema` and returns its rows; raises RequestError naming the field.

  require_user_id: `req.user_id` must be set (a ranker that consumes a user embedding).
  server_filled: dense features of `schema` the server fills (user_emb_*): a client sending one is
  an error; their rows stay 0 here. user_features: the user tower's features, which `req.features`
  may also carry; those not in `schema` are validated by `encode_user_row`, not encoded here.
  """
  if not isinstance(req, RankRequest):
    raise RequestError(f"expected a RankRequest, got {type(req).__name__}")
  check_user_id(req.user_id, required=require_user_id)
  if not isinstance(req.features, dict):
    raise RequestError(f"features: expected a dict, got {type(req.features).__name__}")
  if not isinstance(req.candidates, list):
    raise RequestError(f"candidates: expected a list, got {type(req.candidates).__name__}")
  n = len(req.candidates)
  if n == 0:
    raise RequestError("candidates: at least one candidate is needed")
  if n > max_candidates:
    raise RequestError(f"candidates: {n} candidates, at most {max_candidates} are allowed")
  dense_idx = {name: i for i, name in enumerate(schema.dense)}
  sparse_idx = {f.name: i for i, f in enumerate(schema.sparse)}
  rows = empty_rows(n, schema)
  extra = frozenset(user_features) - set(dense_idx) - set(sparse_idx)
  shared = _check_features(_known(req.features, "features", server_filled, extra), "features", schema,
                           dense_idx, sparse_idx)
  if _encode_fast(req.candidates, shared, rows, schema, dense_idx, sparse_idx, server_filled):
    return rows
  rows = empty_rows(n, schema)  # the per-candidate path: it raises the first error in request order
  for r, cand in enumerate(req.candidates):
    if not isinstance(cand, dict):
      raise RequestError(f"candidates[{r}]: expected a dict of features, got {type(cand).__name__}")
    own = _check_features(_known(cand, f"candidates[{r}]", server_filled, frozenset()), f"candidates[{r}]",
                          schema, dense_idx, sparse_idx)
    for name, value in {**shared, **own}.items():
      if name in dense_idx:
        rows.dense[r, dense_idx[name]] = value
      else:
        j = sparse_idx[name]
        rows.sparse[r, j, :len(value)] = value
        rows.sparse_mask[r, j, :len(value)] = True
  return rows


def _encode_fast(cands: list, shared: dict, rows: Rows, schema: Schema, dense_idx: dict[str, int],
                 sparse_idx: dict[str, int], server_filled: frozenset[str]) -> bool:
  """Fills `rows` column by column (numpy, no per-value Python work beyond a type check) when every
  candidate feature is a known dense number or a single sparse id that passes its checks. Returns
  False, leaving `rows` partly written, at the first thing it does not handle (anything invalid,
  lists of ids): the caller then encodes per candidate, which names the first error in order."""
  for name, value in shared.items():
    if name in dense_idx:
      rows.dense[:, dense_idx[name]] = value
    else:
      rows.sparse[:, sparse_idx[name], :len(value)] = value
      rows.sparse_mask[:, sparse_idx[name], :len(value)] = True
  cols = _columns(cands)
  if cols is None:
    return False
  for name, (idx, vals) in cols.items():
    if name in server_filled:
      return False
    try:
      if name in dense_idx:
        if not all(type(v) is float or type(v) is int for v in vals):
          return False
        x = np.asarray(vals, np.float64)
        if not (np.isfinite(x).all() and (np.abs(x) <= F32_MAX).all()):
          return False
        rows.dense[idx, dense_idx[name]] = x
      elif name in sparse_idx:
        feat = schema.sparse[sparse_idx[name]]
        if not all(type(v) is int for v in vals):
          return False
        ids = np.asarray(vals, np.int64)
        hi = MAX_HASHED_ID if feat.vocab_size is None else feat.vocab_size - 1
        if not ((ids >= 0).all() and (ids <= hi).all()):
          return False
        j = sparse_idx[name]
        rows.sparse[idx, j, :] = 0
        rows.sparse_mask[idx, j, :] = False
        rows.sparse[idx, j, 0] = ids
        rows.sparse_mask[idx, j, 0] = True
      else:
        return False
    except OverflowError:  # an int beyond int64 / float64
      return False
  return True


def _columns(cands: list) -> dict[str, tuple[slice | list[int], Sequence]] | None:
  """{feature name: (rows, values)} of the candidates' feature dicts; None if one is not a dict.
  When every candidate names the same features in the same order (the usual case) the columns are
  cut with zip, in C."""
  first = cands[0]
  if type(first) is dict:
    names = tuple(first)
    if all(type(c) is dict and tuple(c) == names for c in cands):
      return {name: (slice(None), vals) for name, vals in zip(names, zip(*(c.values() for c in cands)))}
  cols: dict[str, tuple[list[int], list]] = {}
  for r, cand in enumerate(cands):
    if type(cand) is not dict:
      return None
    for name, v in cand.items():
      col = cols.get(name)
      if col is None:
        cols[name] = col = ([], [])
      col[0].append(r)
      col[1].append(v)
  return cols


def check_user_id(user_id, *, required: bool) -> None:
  """RequestError unless `user_id` is None (and not required) or an int in [0, 2**63)."""
  if user_id is None:
    if required:
      raise RequestError("user_id: required (this ranker consumes a user embedding, cached per user)")
    return
  if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer)):
    raise RequestError(f"user_id: must be an integer, got {type(user_id).__name__}")
  if not 0 <= user_id <= MAX_USER_ID:
    raise RequestError(f"user_id: {user_id} out of range [0, 2**63 - 1]")


def encode_user_row(features: dict, schema: Schema, names: frozenset[str]) -> Rows:
  """One row of `schema` (the user tower's) from a request's `features`, filling only `names` (the
  features the tower reads; the rest of the row is empty, others in `features` are skipped).
  Raises RequestError naming the field."""
  dense_idx = {name: i for i, name in enumerate(schema.dense)}
  sparse_idx = {f.name: i for i, f in enumerate(schema.sparse)}
  rows = empty_rows(1, schema)
  feats = _check_features({k: v for k, v in features.items() if k in names}, "features", schema, dense_idx,
                          sparse_idx)
  for name, value in feats.items():
    if name in dense_idx:
      rows.dense[0, dense_idx[name]] = value
    else:
      j = sparse_idx[name]
      rows.sparse[0, j, :len(value)] = value
      rows.sparse_mask[0, j, :len(value)] = True
  return rows


def _known(feats, where: str, server_filled: frozenset[str], skip: frozenset[str]) -> dict:
  """`feats` without the names in `skip`; RequestError for a server-filled one."""
  if not isinstance(feats, dict):
    raise RequestError(f"{where}: expected a dict, got {type(feats).__name__}")
  out = {}
  for name, value in feats.items():
    if name in server_filled:
      raise RequestError(f"{where}.{name}: filled by the server (the user model's embedding); do not send it")
    if name not in skip:
      out[name] = value
  return out


F32_MAX = float(np.finfo(np.float32).max)


def _dense_value(value: int | float, field: str) -> float:
  """`value` as a float that float32 holds (finite, |x| <= 3.4e38); RequestError otherwise."""
  try:
    x = float(value)
  except OverflowError:  # an int beyond float64
    x = math.inf
  if not math.isfinite(x) or abs(x) > F32_MAX:
    raise RequestError(f"{field}: dense feature must be finite and within float32 range "
                       f"(|x| <= {F32_MAX:.3g}), got {value if math.isfinite(x) else x}")
  return x


def _check_features(feats: dict, where: str, schema: Schema, dense_idx: dict[str, int],
                    sparse_idx: dict[str, int]) -> dict[str, float | list[int]]:
  """{name: float (dense) or list of ids (sparse)} of one feature dict, validated."""
  out: dict[str, float | list[int]] = {}
  for name, value in feats.items():
    field = f"{where}.{name}"
    if name in dense_idx:
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{field}: dense feature must be a number, got {type(value).__name__}")
      out[name] = _dense_value(value, field)
    elif name in sparse_idx:
      feat = schema.sparse[sparse_idx[name]]
      ids = value if isinstance(value, list) else [value]
      if len(ids) > feat.max_len:
        raise RequestError(f"{field}: {len(ids)} ids, the feature holds at most {feat.max_len}")
      hi = MAX_HASHED_ID if feat.vocab_size is None else feat.vocab_size - 1
      for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
          raise RequestError(f"{field}: sparse feature ids must be integers, got {type(i).__name__}")
        if not 0 <= i <= hi:
          raise RequestError(f"{field}: id {i} out of range [0, {hi}]")
      out[name] = [int(i) for i in ids]
    else:
      raise RequestError(f"{field}: unknown feature (the model's features are "
                         f"{list(schema.dense) + list(sparse_idx)})")
  return out


@dataclasses.dataclass(frozen=True)
class EncodedRequest:
  """A validated request in the model's layout, ready for `Engine.submit_encoded`: its candidate rows
  and, for a ranker that consumes a user model, the user id (cache key) and the tower's row [1]."""

  rows: Rows
  user_id: int | None = None
  user_row: Rows | None = None


@dataclasses.dataclass(frozen=True)
class RequestEncoder:
  """Everything validation and encoding need, apart from the engine (plain data, picklable: the
  HTTP worker processes of `python -m serve --workers N` encode with it and send the rows over).

  user_schema / user_features: the user tower's schema and the features it reads (None / empty for
  a ranker without a user model); server_filled: dense features the server fills (user_emb_*).
  """

  schema: Schema
  max_candidates: int
  user_schema: Schema | None = None
  user_features: frozenset[str] = frozenset()
  server_filled: frozenset[str] = frozenset()

  def encode(self, req: RankRequest) -> EncodedRequest:
    """Validates and encodes `req`; raises RequestError naming the offending field."""
    if self.user_schema is None:
      return EncodedRequest(encode_request(req, self.schema, max_candidates=self.max_candidates), req.user_id)
    rows = encode_request(req, self.schema, max_candidates=self.max_candidates, require_user_id=True,
                          server_filled=self.server_filled, user_features=self.user_features)
    return EncodedRequest(rows, int(req.user_id), encode_user_row(req.features, self.user_schema,
                                                                   self.user_features))
