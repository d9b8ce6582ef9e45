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
  """A request the engine cannot score (HTTP 4xx); the message names the offending field.

  `where` is the part of the request ("features", "candidates", "candidates[3]", "user_id", or None
  for the request as a whole), `name` the feature's name within it (or None), `reason` the message
  without them: "candidates[3].ad_id: id 7 out of range" is where="candidates[3]", name="ad_id".
  Kept apart, so that a feature name holding ": " or spaces cannot be misread (serve.app maps them
  to the body's path).
  """

  def __init__(self, reason: str, where: str | None = None, name: str | None = None):
    field = where if name is None else f"{where}.{name}"
    super().__init__(reason if field is None else f"{field}: {reason}")
    self.reason, self.where, self.name = reason, where, name

  def __reduce__(self):  # pickled across the worker processes' link with its parts
    return type(self), (self.reason, self.where, self.name)


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
    raise RequestError(f"expected a dict, got {type(req.features).__name__}", "features")
  if not isinstance(req.candidates, list):
    raise RequestError(f"expected a list, got {type(req.candidates).__name__}", "candidates")
  n = len(req.candidates)
  if n == 0:
    raise RequestError("at least one candidate is needed", "candidates")
  if n > max_candidates:
    raise RequestError(f"{n} candidates, at most {max_candidates} are allowed", "candidates")
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
      raise RequestError(f"expected a dict of features, got {type(cand).__name__}", f"candidates[{r}]")
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
      raise RequestError("required (this ranker consumes a user embedding, cached per user)", "user_id")
    return
  if isinstance(user_id, bool) or not isinstance(user_id, (int, np.integer)):
    raise RequestError(f"must be an integer, got {type(user_id).__name__}", "user_id")
  if not 0 <= user_id <= MAX_USER_ID:
    raise RequestError(f"{user_id} out of range [0, 2**63 - 1]", "user_id")


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
    raise RequestError(f"expected a dict, got {type(feats).__name__}", where)
  out = {}
  for name, value in feats.items():
    if name in server_filled:
      raise RequestError("filled by the server (the user model's embedding); do not send it", where, name)
    if name not in skip:
      out[name] = value
  return out


F32_MAX = float(np.finfo(np.float32).max)


def _dense_value(value: int | float, where: str, name: str) -> float:
  """`value` as a float that float32 holds (finite, |x| <= 3.4e38); RequestError otherwise."""
  try:
    x = float(value)
  except OverflowError:  # an int beyond float64
    x = math.inf
  if not math.isfinite(x) or abs(x) > F32_MAX:
    raise RequestError(f"dense feature must be finite and within float32 range "
                       f"(|x| <= {F32_MAX:.3g}), got {value if math.isfinite(x) else x}", where, name)
  return x


def _check_features(feats: dict, where: str, schema: Schema, dense_idx: dict[str, int],
                    sparse_idx: dict[str, int]) -> dict[str, float | list[int]]:
  """{name: float (dense) or list of ids (sparse)} of one feature dict, validated."""
  out: dict[str, float | list[int]] = {}
  for name, value in feats.items():
    if name in dense_idx:
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"dense feature must be a number, got {type(value).__name__}", where, name)
      out[name] = _dense_value(value, where, name)
    elif name in sparse_idx:
      feat = schema.sparse[sparse_idx[name]]
      ids = value if isinstance(value, list) else [value]
      if len(ids) > feat.max_len:
        raise RequestError(f"{len(ids)} ids, the feature holds at most {feat.max_len}", where, name)
      hi = MAX_HASHED_ID if feat.vocab_size is None else feat.vocab_size - 1
      for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
          raise RequestError(f"sparse feature ids must be integers, got {type(i).__name__}", where, name)
        if not 0 <= i <= hi:
          raise RequestError(f"id {i} out of range [0, {hi}]", where, name)
      out[name] = [int(i) for i in ids]
    else:
      raise RequestError(f"unknown feature (the model's features are "
                         f"{list(schema.dense) + list(sparse_idx)})", where, name)
  return out


@dataclasses.dataclass(frozen=True)
class EncodedRequest:
  """A validated request in the model's layout, ready for `Engine.submit_encoded`: its candidate rows
  and, for a ranker that consumes a user model, the user id (cache key) and the tower's row [1]."""

  rows: Rows
  user_id: int | None = None
  user_row: Rows | None = None


def json_counts(raw: bytes) -> tuple[int, int]:
  """(objects, values) of a JSON body, counted without parsing it: its '{' bytes, and its '{', '['
  and ',' bytes (each object, array and item needs one; strings holding them only add): what
  `RequestEncoder.max_json_objects` / `max_json_values` bound."""
  objects = raw.count(b"{")
  return objects, objects + raw.count(b"[") + raw.count(b",")


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

  def max_json_values(self) -> int:
    """An upper bound on the '{', '[' and ',' bytes of any valid JSON body (serve.app's RankBody) for
    this model: max_candidates candidates, each and the request sending every feature once, sparse
    ones with max_len ids. serve.app refuses a body with more before parsing it: parsing costs time
    and heap per value, and two megabytes of tiny candidates held the event loop for hundreds of ms
    (docs/BENCHMARKS.md), however few candidates the model accepts."""
    lens = {f.name: f.max_len for f in self.schema.sparse}
    names = {n for n in self.schema.dense if n not in self.server_filled} | set(lens)
    if self.user_schema is not None:
      u = {f.name: f.max_len for f in self.user_schema.sparse if f.name in self.user_features}
      lens = {**u, **lens}
      names |= set(self.user_features)
    per_dict = max(1, len(names) + sum(lens.get(n, 0) for n in names))  # '{' and commas; each list's '[' and commas
    per_candidate = 3 + per_dict  # its '{', the comma after item_id, the comma after it
    return 5 + per_dict + self.max_candidates * per_candidate + 64  # the body's '{', '[', 3 commas; slack

  def max_json_objects(self) -> int:
    """An upper bound on the '{' bytes of any valid JSON body for this model: the body's, its
    features', and two per candidate (itself and its features), plus slack. Each candidate needs
    one, so this bounds the candidates a body can make the server parse to about max_candidates."""
    return 2 + 2 * self.max_candidates + 8

  def encode(self, req: RankRequest) -> EncodedRequest:
    """Validates and encodes `req`; raises RequestError naming the offending field."""
    if self.user_schema is None:
      return EncodedRequest(encode_request(req, self.schema, max_candidates=self.max_candidates), req.user_id)
    rows = encode_request(req, self.schema, max_candidates=self.max_candidates, require_user_id=True,
                          server_filled=self.server_filled, user_features=self.user_features)
    return EncodedRequest(rows, int(req.user_id), encode_user_row(req.features, self.user_schema,
                                                                   self.user_features))
