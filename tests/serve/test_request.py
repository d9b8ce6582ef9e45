"""serve.request.encode_request: the column-wise fast path equals a per-candidate reference."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrec.data.batch import Schema, SparseFeature
from serve.request import RankRequest, RequestError, encode_request

SCHEMA = Schema(dense=("price", "score"), sparse=(SparseFeature("ad", 50), SparseFeature("tags", 20, max_len=3),
                                                   SparseFeature("hashed", None)), labels=("click",))


def reference(req: RankRequest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row r = the request's features overridden by candidate r's, written one value at a time."""
  n, names = len(req.candidates), [f.name for f in SCHEMA.sparse]
  dense = np.zeros((n, 2), np.float32)
  sparse = np.zeros((n, 3, 3), np.int32)
  mask = np.zeros((n, 3, 3), bool)
  for r, cand in enumerate(req.candidates):
    for name, v in {**req.features, **cand}.items():
      if name in SCHEMA.dense:
        dense[r, SCHEMA.dense.index(name)] = v
      else:
        ids = v if isinstance(v, list) else [v]
        sparse[r, names.index(name), :len(ids)] = ids
        mask[r, names.index(name), :len(ids)] = True
  return dense, sparse, mask


def feature_dicts(shared: bool):
  value = {"price": st.floats(-1e3, 1e3, allow_nan=False) | st.integers(-5, 5), "score": st.floats(0, 1),
           "ad": st.integers(0, 49), "tags": st.lists(st.integers(0, 19), min_size=1, max_size=3) | st.integers(0, 19),
           "hashed": st.integers(0, 2**31 - 1)}
  if not shared:  # candidates mostly carry single ids (the fast path), sometimes lists (the per-row path)
    value["tags"] = st.integers(0, 19) | st.lists(st.integers(0, 19), min_size=1, max_size=3)
  return st.fixed_dictionaries({}, optional=value)



def assert_encodes_like_reference(req: RankRequest) -> None:
  rows = encode_request(req, SCHEMA, max_candidates=16)
  dense, sparse, mask = reference(req)
  np.testing.assert_array_equal(rows.dense, dense)
  np.testing.assert_array_equal(rows.sparse, sparse)
  np.testing.assert_array_equal(rows.sparse_mask, mask)

@settings(max_examples=150, deadline=None)
@given(shared=feature_dicts(True), cands=st.lists(feature_dicts(False), min_size=1, max_size=12))
def test_fast_path_matches_reference(shared, cands):
  req = RankRequest(shared, cands)
  assert_encodes_like_reference(req)


def test_candidate_overrides_a_shared_list_of_ids():
  rows = encode_request(RankRequest({"tags": [1, 2, 3]}, [{}, {"tags": 7}]), SCHEMA, max_candidates=4)
  assert rows.sparse[:, 1].tolist() == [[1, 2, 3], [7, 0, 0]]
  assert rows.sparse_mask[:, 1].tolist() == [[True] * 3, [True, False, False]]


def test_the_first_error_in_request_order_is_named():
  """Two bad candidates in different columns: the error names the earlier candidate, whatever the
  column order of the fast path."""
  cands = [{"ad": 1}] * 2 + [{"price": float("nan")}] + [{"ad": 1}] * 2 + [{"ad": 99}]
  cands[0] = {"ad": 1, "price": 1.0}
  with pytest.raises(RequestError, match=r"candidates\[2\]\.price: dense feature must be finite"):
    encode_request(RankRequest({}, cands), SCHEMA, max_candidates=16)
  cands[2] = {"price": 2.0}
  with pytest.raises(RequestError, match=r"candidates\[5\]\.ad: id 99 out of range \[0, 49\]"):
    encode_request(RankRequest({}, cands), SCHEMA, max_candidates=16)


@pytest.mark.parametrize("bad, match", [
    ({"ad": True}, r"candidates\[1\]\.ad: sparse feature ids must be integers, got bool"),
    ({"price": 10**400}, r"candidates\[1\]\.price: dense feature must be finite"),
    ({"hashed": 2**31}, r"candidates\[1\]\.hashed: id 2147483648 out of range"),
    ({"ad": 2**70}, r"candidates\[1\]\.ad: id 1180591620717411303424 out of range"),
    ({"nope": 1}, r"candidates\[1\]\.nope: unknown feature"),
])
def test_values_the_fast_path_refuses_get_the_per_candidate_error(bad, match):
  with pytest.raises(RequestError, match=match):
    encode_request(RankRequest({}, [{"ad": 1}, bad]), SCHEMA, max_candidates=4)


def test_numpy_scalars_are_accepted_as_before():
  rows = encode_request(RankRequest({}, [{"price": np.float64(0.5), "ad": np.int64(3)}]), SCHEMA, max_candidates=4)
  assert rows.dense[0, 0] == 0.5 and rows.sparse[0, 0, 0] == 3


@settings(max_examples=60, deadline=None)
@given(shared=feature_dicts(True), n=st.integers(1, 10), seed=st.integers(0, 2**16), reorder=st.booleans())
def test_candidates_with_the_same_features_match_reference(shared, n, seed, reorder):
  """The zip path (every candidate names the same features in the same order), and the general
  path when one candidate lists them in another order."""
  rng = np.random.default_rng(seed)
  cands = [{"ad": int(rng.integers(50)), "price": float(rng.normal()), "tags": int(rng.integers(20))} for _ in range(n)]
  if reorder:
    cands[-1] = dict(reversed(list(cands[-1].items())))
  req = RankRequest(shared, cands)
  assert_encodes_like_reference(req)
