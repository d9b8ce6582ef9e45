"""Readers: real files from the shared data folder (facts from its README), and bad input.

Real-data tests read `$JAXREC_DATA_DIR` (else `<repo>/../shared/data`) and skip when it is absent.
Bad-input tests write tiny made-up files to tmp_path; none of them copies real rows.
"""

from __future__ import annotations

import dataclasses
import doctest
import math
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrec.data import paths
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.examples import Examples
from jaxrec.data.readers import (FRAPPE_FIELDS, criteo, pv_to_buy_delays, read_aliccp, read_aliexpress, read_criteo,
                                 read_criteo_csv, read_libfm, read_movielens, read_taobao_events, taobao_examples)
from jaxrec.data.readers.taobao import BUY, CART, FAV, PV, WINDOW_END, WINDOW_START, taobao_time_split
from jaxrec.data.sources import DataConfig, open_train_eval

# Generous bound: the readers take well under a second each here; this only catches blow-ups.
MAX_PARSE_S = 10.0


def _timed(fn, *args, **kwargs):
  t = time.perf_counter()
  out = fn(*args, **kwargs)
  elapsed = time.perf_counter() - t
  assert elapsed < MAX_PARSE_S, f"{fn.__name__} took {elapsed:.1f} s"
  return out


def _check_error(exc: pytest.ExceptionInfo, path: Path, line: int | None, field: str | None) -> None:
  """The DataFormatError carries, and its message names, the file, the line and the field."""
  err = exc.value
  assert isinstance(err, DataFormatError)
  assert (err.path, err.line, err.field) == (str(path), line, field), str(err)
  msg = str(err)
  assert msg.startswith(str(path) if line is None else f"{str(path)}:{line}:"), msg
  if field is not None:
    assert f"field {field}:" in msg, msg


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
  path.write_text(end.join(lines) + end, encoding="utf-8")
  return path


def _one_hot_ids(ex: Examples) -> np.ndarray:
  assert ex.data.sparse.shape[2] == 1
  return ex.data.sparse[:, :, 0]


# --------------------------------------------------------------------------------------------
# Real data


@pytest.mark.realdata
def test_criteo_kaggle_head(data_dir):
  ex = _timed(read_criteo, data_dir / "criteo_kaggle_head1k" / "train.txt")
  assert len(ex) == 1000
  assert int(ex.data.labels.sum()) == 205
  assert ex.schema.num_dense == 13 and ex.schema.num_sparse == 26 and ex.schema.labels == ("click",)
  assert all(f.vocab_size is None for f in ex.schema.sparse)
  assert np.all(ex.data.dense >= 0) and np.all(ex.data.sparse <= 0x7FFFFFFF)
  np.testing.assert_array_equal(ex.data.timestamp, np.arange(1000))
  # The padded rows (37/38 columns) end in masked categoricals; C26 is missing in many rows.
  assert not ex.data.sparse_mask[:, -1, 0].all()
  assert np.all(ex.data.sparse[~ex.data.sparse_mask] == 0)
  head = _timed(read_criteo, data_dir / "criteo_kaggle_head1k" / "train.txt", max_rows=10)
  assert len(head) == 10
  np.testing.assert_array_equal(head.data.sparse, ex.data.sparse[:10])


@pytest.mark.realdata
def test_criteo_deepctr_csv(data_dir):
  path = data_dir / "deepctr_samples" / "criteo_sample.txt"
  ex = _timed(read_criteo_csv, path)
  assert len(ex) == 200 and int(ex.data.labels.sum()) == 49
  same = read_criteo(path, delimiter=",")  # the header is auto-detected either way
  np.testing.assert_array_equal(same.data.dense, ex.data.dense)


@pytest.mark.realdata
def test_frappe(data_dir):
  ex = _timed(read_libfm, data_dir / "frappe" / "frappe.validation.libfm")
  assert len(ex) == 57_722
  assert int(ex.data.labels.sum()) == 19_063
  assert tuple(f.name for f in ex.schema.sparse) == FRAPPE_FIELDS
  assert {f.vocab_size for f in ex.schema.sparse} == {5382}  # README: 5,382 features in total
  ids = _one_hot_ids(ex)
  assert np.all(np.diff(ids, axis=1) > 0)
  # Fields occupy disjoint index ranges, in field order.
  assert np.all(ids.max(axis=0)[:-1] < ids.min(axis=0)[1:])


@pytest.mark.realdata
def test_movielens_100k(data_dir):
  ex = _timed(read_movielens, data_dir / "ml-100k")
  assert len(ex) == 100_000
  assert int(ex.data.labels.sum()) == 34_174 + 21_201
  names = [f.name for f in ex.schema.sparse]
  assert names == ["user_id", "item_id", "age_bucket", "gender", "occupation", "zip_region", "zip3",
                   "release_year_bucket", "genres"]
  ids = ex.data.sparse[:, :, 0]
  assert np.unique(ids[:, 0]).size == 943 and np.unique(ids[:, 1]).size == 1682
  genres = ex.schema.sparse[-1]
  assert genres.vocab_size == 19 and genres.max_len == ex.schema.max_len == 6
  # 382 distinct zip prefixes, one id each (hashed into 1024 buckets, 72 of them shared one)
  zip3 = names.index("zip3")
  assert ex.schema.sparse[zip3].vocab_size == 382
  assert np.unique(ids[ex.data.sparse_mask[:, zip3, 0], zip3]).size == 382
  assert ex.data.sparse_mask[:, -1, 0].all()  # every movie has at least one genre flag
  # ml-100k spans 1997-09-20 .. 1998-04-22.
  assert 874_700_000 < ex.data.timestamp.min() and ex.data.timestamp.max() < 893_400_000
  assert np.all((ex.data.dense >= 0) & (ex.data.dense <= 1))


@pytest.fixture(scope="module")
def taobao(data_dir):
  return _timed(read_taobao_events, data_dir / "taobao_userbehavior_head" / "UserBehavior.csv")


@pytest.mark.realdata
def test_taobao_events(taobao):
  assert taobao.num_outside_window == 35
  assert len(taobao) == 84_475 - 35
  assert np.unique(taobao.user_id).size == 815
  # README counts are before the filter; all 35 dropped rows are pv.
  counts = np.bincount(taobao.behavior, minlength=4)
  assert counts.sum() + taobao.num_outside_window == 75_872 + 4_497 + 2_356 + 1_750
  assert (counts[PV], counts[CART], counts[FAV], counts[BUY]) == (75_872 - 35, 4_497, 2_356, 1_750)
  assert taobao.timestamp.min() >= WINDOW_START and taobao.timestamp.max() <= WINDOW_END
  same_user = np.diff(taobao.user_id) == 0
  assert np.all(np.diff(taobao.user_id) >= 0) and np.all(np.diff(taobao.timestamp)[same_user] >= 0)


@pytest.mark.realdata
def test_taobao_pv_to_buy_delays(taobao):
  delays = _timed(pv_to_buy_delays, taobao)
  assert delays.size == 921
  assert np.all(delays >= 0)
  assert 40 < np.median(delays) / 60 < 48  # README: p50 44 min
  assert 3 < np.quantile(delays, 0.1) / 60 < 4.5  # p10 3.6 min
  assert 50 < np.quantile(delays, 0.9) / 3600 < 52.5  # p90 51 h


@pytest.mark.realdata
def test_taobao_examples(taobao):
  ex = _timed(taobao_examples, taobao)
  assert len(ex) == 75_872 - 35
  assert ex.schema.labels == ("cart_or_fav", "buy")
  assert [f.vocab_size for f in ex.schema.sparse] == [None, None, None, 24]  # raw ids, hashed by the model
  # Brute force: a pv's label is 1 when the same user-item has a cart/fav (buy) at or after it.
  later: dict[tuple[int, int], list[int]] = {}
  for u, i, b, t in zip(taobao.user_id.tolist(), taobao.item_id.tolist(), taobao.behavior.tolist(),
                        taobao.timestamp.tolist()):
    last = later.setdefault((u, i), [-1, -1])
    if b in (CART, FAV):
      last[0] = max(last[0], t)
    elif b == BUY:
      last[1] = max(last[1], t)
  pv = taobao.behavior == PV
  want = [[t <= later[(u, i)][0], t <= later[(u, i)][1]]
          for u, i, t in zip(taobao.user_id[pv].tolist(), taobao.item_id[pv].tolist(), taobao.timestamp[pv].tolist())]
  np.testing.assert_array_equal(ex.data.labels, np.asarray(want, np.float32))
  np.testing.assert_array_equal(ex.data.timestamp, taobao.timestamp[pv])
  ids = _one_hot_ids(ex)
  np.testing.assert_array_equal(ids[:, :3], np.stack([taobao.user_id, taobao.item_id, taobao.category_id], 1)[pv])
  assert ids[:, 3].max() < 24


@pytest.mark.realdata
@pytest.mark.parametrize("split, rows, clicks, purchases", [("train", 100, 7, 1), ("val", 50, 3, 1),
                                                          ("test", 50, 2, 1)])
def test_aliccp(data_dir, split, rows, clicks, purchases):
  ex = _timed(read_aliccp, data_dir / "ali_ccp_sample" / f"ali_ccp_{split}_sample.csv")
  assert len(ex) == rows
  assert ex.data.labels.sum(axis=0).tolist() == [clicks, purchases]
  assert ex.schema.labels == ("click", "purchase")
  assert ex.schema.num_sparse == 23 and ex.schema.num_dense == 8
  assert all(name.startswith("D") for name in ex.schema.dense)
  assert ex.schema.num_domains == 1 and np.all(ex.data.domain == 0)  # single scenario 301=1


@pytest.mark.realdata
def test_aliccp_shared_vocab(data_dir):
  files = [data_dir / "ali_ccp_sample" / f"ali_ccp_{s}_sample.csv" for s in ("train", "val", "test")]
  first = [read_aliccp(f) for f in files]
  sizes = {f.name: max(e.schema.sparse[j].vocab_size for e in first) for j, f in enumerate(first[0].schema.sparse)}
  again = [read_aliccp(f, vocab_sizes=sizes) for f in files]
  assert len({e.schema for e in again}) == 1


@pytest.mark.realdata
@pytest.mark.parametrize("rel, rows, clicks, conversions", [
    ("aliexpress_sample/aliexpress_train_sample.csv", 100, 60, 2),
    ("aliexpress_sample/aliexpress_test_sample.csv", 20, 10, 2),
    ("fuxictr_tiny_mtl/train.csv", 100, 3, 2),
    ("fuxictr_tiny_mtl/test.csv", 100, 6, 1),
])
def test_aliexpress(data_dir, rel, rows, clicks, conversions):
  ex = _timed(read_aliexpress, data_dir / rel)
  assert len(ex) == rows
  assert ex.data.labels.sum(axis=0).tolist() == [clicks, conversions]
  assert ex.schema.labels == ("click", "conversion")
  assert [f.name for f in ex.schema.sparse] == [f"categorical_{i}" for i in range(1, 17)]
  assert list(ex.schema.dense) == [f"numerical_{i}" for i in range(1, 64)]


def test_require_data(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path))
  assert paths.default_data_dir() == tmp_path
  (tmp_path / "frappe").mkdir()
  assert paths.require_data("frappe") == tmp_path / "frappe"
  with pytest.raises(DataFormatError, match=paths.DATA_DIR_ENV) as exc:
    paths.require_data("ml-100k")
  _check_error(exc, tmp_path / "ml-100k", None, None)
  monkeypatch.delenv(paths.DATA_DIR_ENV)
  assert paths.default_data_dir() == Path(paths.__file__).resolve().parents[2].parent / "shared" / "data"


# --------------------------------------------------------------------------------------------
# Criteo: made-up rows


def _criteo_row(label="0", ints=None, cats=None, sep="\t") -> str:
  ints = [str(i) for i in range(13)] if ints is None else ints
  cats = [f"{0x1000 + j:08x}" for j in range(26)] if cats is None else cats
  return sep.join([label, *ints, *cats])


def test_criteo_values(tmp_path):
  ints = ["", "-3", "0", "7", *["1"] * 9]
  cats = ["", "FFFFFFFF", "0", "a", *["00000001"] * 22]
  short = _criteo_row("1").split("\t")[:38]  # trailing empties dropped: 38 columns
  path = _write(tmp_path / "c.txt", [_criteo_row("0", ints, cats), "\t".join(short)])
  ex = read_criteo(path)
  np.testing.assert_allclose(ex.data.dense[0, :4], [0.0, 0.0, 0.0, math.log(8.0)], rtol=1e-6)
  np.testing.assert_array_equal(ex.data.sparse[0, :4, 0], [0, 0x7FFFFFFF, 0, 10])
  np.testing.assert_array_equal(ex.data.sparse_mask[0, :4, 0], [False, True, True, True])
  np.testing.assert_array_equal(ex.data.sparse_mask[1, :, 0], [True] * 24 + [False] * 2)
  np.testing.assert_array_equal(ex.data.labels[:, 0], [0, 1])
  np.testing.assert_array_equal(ex.data.weights, [1, 1])


@pytest.mark.parametrize("row, field", [
    (_criteo_row() + "\textra", None),
    ("\t".join(_criteo_row().split("\t")[:30]), "C17"),
    (_criteo_row(ints=["1", "x", *["1"] * 11]), "I2"),
    (_criteo_row(ints=["1", "nan", *["1"] * 11]), "I2"),
    (_criteo_row(cats=["zz", *["1"] * 25]), "C1"),
    (_criteo_row(cats=["1", "123456789", *["1"] * 24]), "C2"),
    (_criteo_row(cats=["1", "0x12", *["1"] * 24]), "C2"),
    (_criteo_row(label="2"), "label"),
    (_criteo_row(label="yes"), "label"),
])
def test_criteo_bad_rows(tmp_path, row, field):
  path = _write(tmp_path / "c.txt", [_criteo_row(), _criteo_row("1"), row])
  with pytest.raises(DataFormatError) as exc:
    read_criteo(path)
  _check_error(exc, path, 3, field)


def test_criteo_csv_header(tmp_path):
  names = ["label", *criteo.DENSE, *criteo.SPARSE]
  good = _write(tmp_path / "good.csv", [",".join(names), _criteo_row("1", sep=","), _criteo_row("0", sep=",")])
  ex = read_criteo_csv(good)
  assert len(ex) == 2 and ex.data.labels[:, 0].tolist() == [1, 0]
  names[5] = "I99"
  bad = _write(tmp_path / "bad.csv", [",".join(names), _criteo_row("1", sep=",")])
  with pytest.raises(DataFormatError, match="'I99'") as exc:
    read_criteo_csv(bad)
  _check_error(exc, bad, 1, "header")
  header_only = _write(tmp_path / "h.csv", [",".join(["label", *criteo.DENSE, *criteo.SPARSE])])
  with pytest.raises(DataFormatError, match="no data rows") as exc:
    read_criteo_csv(header_only)
  _check_error(exc, header_only, None, None)


@pytest.mark.parametrize("reader", [read_criteo, read_libfm, read_taobao_events, read_aliccp, read_aliexpress])
def test_missing_and_empty_files(tmp_path, reader):
  missing = tmp_path / "nope.txt"
  with pytest.raises(DataFormatError, match="no such file") as exc:
    reader(missing)
  _check_error(exc, missing, None, None)
  empty = _write(tmp_path / "empty.txt", ["", "  "])
  with pytest.raises(DataFormatError, match="empty file") as exc:
    reader(empty)
  _check_error(exc, empty, None, None)


def test_not_utf8(tmp_path):
  path = tmp_path / "c.txt"
  path.write_bytes((_criteo_row() + "\n").encode() + b"1\t\xff\xfe\n")
  with pytest.raises(DataFormatError, match="utf-8") as exc:
    read_criteo(path)
  _check_error(exc, path, 2, None)


# --------------------------------------------------------------------------------------------
# libFM: made-up rows


def test_libfm_values(tmp_path):
  path = _write(tmp_path / "f.libfm", ["1 0:1 5:1 9:1", "-1 2:1 6:1 12:1", "0 1:1.0 7:1 8:1"], end="\r\n")
  ex = read_libfm(path)
  assert [f.name for f in ex.schema.sparse] == ["f0", "f1", "f2"]
  assert {f.vocab_size for f in ex.schema.sparse} == {13}
  np.testing.assert_array_equal(_one_hot_ids(ex), [[0, 5, 9], [2, 6, 12], [1, 7, 8]])
  np.testing.assert_array_equal(ex.data.labels[:, 0], [1, 0, 0])
  named = read_libfm(path, field_names=("a", "b", "c"), vocab_size=20)
  assert [(f.name, f.vocab_size) for f in named.schema.sparse] == [("a", 20), ("b", 20), ("c", 20)]


@pytest.mark.parametrize("row, field", [
    ("2 0:1 5:1 9:1", "label"),
    ("x 0:1 5:1 9:1", "label"),
    ("1 0:1 5:1", "f2"),
    ("1 0:1 5:1 9:1 10:1", None),
    ("1 0:1 5:0.5 9:1", "f1"),
    ("1 0:1 5 9:1", "f1"),
    ("1 0:1 b:1 9:1", "f1"),
    ("1 0:1 -5:1 9:1", "f1"),
    ("1 3:1 2:1 9:1", "f1"),
    ("", "label"),
])
def test_libfm_bad_rows(tmp_path, row, field):
  path = _write(tmp_path / "f.libfm", ["1 0:1 5:1 9:1", row, "1 0:1 5:1 9:1"])
  with pytest.raises(DataFormatError) as exc:
    read_libfm(path)
  _check_error(exc, path, 2, field)


def test_libfm_bad_arguments(tmp_path):
  path = _write(tmp_path / "f.libfm", ["1 0:1 5:1 9:1", "-1 1:1 6:1 11:1"])
  with pytest.raises(DataFormatError, match="field_names") as exc:
    read_libfm(path, field_names=("a", "b"))
  _check_error(exc, path, 1, None)
  with pytest.raises(DataFormatError, match="vocab_size 10") as exc:
    read_libfm(path, field_names=("a", "b", "c"), vocab_size=10)
  _check_error(exc, path, 2, "c")


# --------------------------------------------------------------------------------------------
# MovieLens: a made-up three-user folder


def _movielens_dir(tmp_path: Path, *, data=None, users=None, items=None) -> Path:
  d = tmp_path / "ml"
  d.mkdir(exist_ok=True)
  flags = lambda *on: "|".join("1" if g in on else "0" for g in range(19))
  users = users or ["1|17|M|student|12345", "2|40|F|writer|T2K5X", "3|60|M|retired|"]
  items = items or [f"1|Film A (1994)|01-Jan-1994||http://x|{flags(1, 2, 5)}",
                    f"2|Film B|||http://y|{flags(0)}", f"5|Film \xe9|05-May-1937||http://z|{flags(8)}"]
  data = data or ["1\t1\t5\t880000000", "2\t2\t3\t880000100", "3\t5\t4\t880000200", "1\t5\t1\t880000300"]
  (d / "u.user").write_text("\n".join(users) + "\n", encoding="utf-8")
  (d / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
  (d / "u.data").write_text("\n".join(data) + "\n", encoding="utf-8")
  return d


def test_movielens_values(tmp_path):
  ex = read_movielens(_movielens_dir(tmp_path))
  s, m, f = ex.data.sparse, ex.data.sparse_mask, {x.name: j for j, x in enumerate(ex.schema.sparse)}
  np.testing.assert_array_equal(ex.data.labels[:, 0], [1, 0, 1, 0])
  np.testing.assert_array_equal(ex.data.timestamp, [880000000, 880000100, 880000200, 880000300])
  np.testing.assert_array_equal(s[:, f["user_id"], 0], [1, 2, 3, 1])
  np.testing.assert_array_equal(s[:, f["item_id"], 0], [1, 2, 5, 5])
  np.testing.assert_array_equal(s[:, f["age_bucket"], 0], [0, 3, 6, 0])
  np.testing.assert_array_equal(s[:, f["gender"], 0], [0, 1, 0, 0])
  np.testing.assert_array_equal(s[:, f["occupation"], 0], [1, 2, 0, 1])  # retired, student, writer
  np.testing.assert_array_equal(s[:, f["zip_region"], 0], [1, 10, 0, 1])
  np.testing.assert_array_equal(m[:, f["zip3"], 0], [True, True, False, True])
  np.testing.assert_array_equal(s[:, f["zip3"], 0], [0, 1, 0, 0])  # "123", "T2K": an exact vocabulary, not hashed
  assert ex.schema.sparse[f["zip3"]].vocab_size == 2
  np.testing.assert_array_equal(s[:, f["release_year_bucket"], 0], [6, 0, 0, 0])
  np.testing.assert_array_equal(m[:, f["release_year_bucket"], 0], [True, False, True, True])
  assert ex.schema.max_len == 3
  np.testing.assert_array_equal(s[0, f["genres"]], [1, 2, 5])
  np.testing.assert_array_equal(m[1, f["genres"]], [True, False, False])
  np.testing.assert_allclose(ex.data.dense[:, 0], [0.17, 0.40, 0.60, 0.17], rtol=1e-6)
  np.testing.assert_allclose(ex.data.dense[:, 1], [0.94, 0.655, 0.37, 0.37], rtol=1e-6)


@pytest.mark.parametrize("file, bad, line, field", [
    ("u.data", ["1\t1\t6\t880000000"], 1, "rating"),
    ("u.data", ["1\t1\t5\t880000000", "9\t1\t5\t880000000"], 2, "user_id"),
    ("u.data", ["1\t1\t5\t880000000", "1\t3\t5\t880000000"], 2, "item_id"),
    ("u.data", ["1\t1\t5\tsoon"], 1, "timestamp"),
    ("u.data", ["1\t1\t5"], 1, "timestamp"),
    ("u.user", ["1|17|X|student|12345"], 1, "gender"),
    ("u.user", ["1|17|M|student|12345", "1|18|F|writer|1"], 2, "user_id"),
    ("u.user", ["1|old|M|student|12345"], 1, "age"),
    ("u.item", ["1|A|01-Jan-1994||u|" + "|".join(["0"] * 18 + ["2"])], 1, "genre_Western"),
    ("u.item", ["1|A|1994||u|" + "|".join(["0"] * 19)], 1, "release_date"),
    ("u.item", ["1|A|01-Jan-1994||u|0|1"], 1, "genre_Adventure"),
])
def test_movielens_bad_input(tmp_path, file, bad, line, field):
  d = _movielens_dir(tmp_path, **{{"u.data": "data", "u.user": "users", "u.item": "items"}[file]: bad})
  with pytest.raises(DataFormatError) as exc:
    read_movielens(d)
  _check_error(exc, d / file, line, field)


def test_movielens_missing(tmp_path):
  with pytest.raises(DataFormatError, match="no such directory") as exc:
    read_movielens(tmp_path / "nope")
  _check_error(exc, tmp_path / "nope", None, None)
  d = _movielens_dir(tmp_path)
  (d / "u.item").unlink()
  with pytest.raises(DataFormatError, match="no such file") as exc:
    read_movielens(d)
  _check_error(exc, d / "u.item", None, None)


# --------------------------------------------------------------------------------------------
# Taobao: a made-up event log

T0 = WINDOW_START + 3600  # 2017-11-25 01:00 Beijing time


def _taobao_file(tmp_path: Path, rows: list[tuple]) -> Path:
  return _write(tmp_path / "ub.csv", [",".join(str(v) for v in r) for r in rows])


def test_taobao_made_up_log(tmp_path):
  path = _taobao_file(tmp_path, [
      (2, 10, 7, "pv", T0 + 50),
      (1, 10, 7, "pv", T0 + 100),
      (1, 11, 8, "pv", T0),
      (1, 10, 7, "cart", T0 + 200),
      (1, 10, 7, "pv", T0 + 300),
      (1, 10, 7, "buy", T0 + 400),
      (1, 11, 8, "pv", WINDOW_START - 1),  # outside the window
      (2, 12, 7, "buy", T0 + 60),  # a buy with no pv
      (2, 10, 7, "fav", WINDOW_END),
      (2, 10, 7, "pv", WINDOW_END + 1),  # outside the window
  ])
  ev = read_taobao_events(path)
  assert ev.num_outside_window == 2 and len(ev) == 8
  np.testing.assert_array_equal(ev.user_id, [1, 1, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ev.timestamp - T0, [0, 100, 200, 300, 400, 50, 60, WINDOW_END - T0])
  np.testing.assert_array_equal(ev.behavior, [PV, PV, CART, PV, BUY, PV, BUY, FAV])
  np.testing.assert_array_equal(pv_to_buy_delays(ev), [300])

  ex = taobao_examples(ev)
  assert len(ex) == 4  # the pv events, in (user, time) order
  np.testing.assert_array_equal(ex.data.labels, [[0, 0], [1, 1], [0, 1], [1, 0]])
  np.testing.assert_array_equal(ex.data.sparse[:, :3, 0], [[1, 11, 8], [1, 10, 7], [1, 10, 7], [2, 10, 7]])
  np.testing.assert_array_equal(ex.data.sparse[:, 3, 0], [1, 1, 1, 1])  # 01:00 Beijing
  assert [f.vocab_size for f in ex.schema.sparse] == [None, None, None, 24]


def test_taobao_time_split_labels_training_views_with_the_past_only(tmp_path):
  """A view before the boundary whose cart or buy comes after it is a negative in training (not yet
  known when training ends): labelled with the whole log, the same later buy made a training view
  and an eval view of the item positive together. Eval views keep their look-ahead labels."""
  path = _taobao_file(tmp_path, [
      (1, 10, 7, "pv", T0), (1, 11, 7, "pv", T0 + 10), (1, 11, 7, "buy", T0 + 20), (2, 12, 8, "pv", T0 + 30),
      (2, 13, 8, "pv", T0 + 40),  # the boundary: the latest 20% of the 5 views starts here
      (1, 10, 7, "pv", T0 + 50), (1, 10, 7, "buy", T0 + 60), (2, 12, 8, "cart", T0 + 70)])
  train, evl = taobao_time_split(read_taobao_events(path), 0.4)
  np.testing.assert_array_equal(train.data.timestamp - T0, [0, 10, 30])
  np.testing.assert_array_equal(train.data.labels, [[0, 0], [0, 1], [0, 0]])  # whole log: [0, 1], .., [1, 0]
  np.testing.assert_array_equal(evl.data.timestamp - T0, [50, 40])
  np.testing.assert_array_equal(evl.data.labels, [[0, 1], [0, 0]])
  cfg = DataConfig(train=f"taobao:{path}@train", batch_size=1, eval_fraction=0.4)
  with pytest.raises(DataSpecError, match="taobao's labels look ahead.*--data.split_by time"):
    open_train_eval(cfg)
  tr, ev = open_train_eval(dataclasses.replace(cfg, split_by="time"))
  np.testing.assert_array_equal(tr.examples.data.labels, train.data.labels)
  np.testing.assert_array_equal(ev.examples.data.labels, evl.data.labels)


def test_aliccp_train_and_eval_files_share_domain_ids(tmp_path):
  """Read apart, a train file with scenarios {1, 2, 3} and an eval file with {2, 3} numbered scenario
  2 as domain 1 and 0; open_train_eval numbers both over the union."""
  header = "click,purchase,101,205,301,D1"
  train = _write(tmp_path / "train.csv", [header] + [f"0,0,{i},{i},{s},0.5" for i, s in enumerate([1, 2, 3, 1])])
  evl = _write(tmp_path / "val.csv", [header] + [f"1,0,{i},{i},{s},0.5" for i, s in enumerate([3, 2])])
  tr, ev = open_train_eval(DataConfig(train=f"aliccp:{train}", eval=f"aliccp:{evl}", batch_size=1))
  assert tr.schema.num_domains == ev.schema.num_domains == 3
  np.testing.assert_array_equal(tr.examples.data.domain, [0, 1, 2, 0])
  np.testing.assert_array_equal(ev.examples.data.domain, [2, 1])


def test_taobao_files_of_one_log_agree_on_ids(tmp_path):
  """A time split into two files: a user, item or category has the same id in both (no per-file remap)."""
  early = _write(tmp_path / "early.csv", ["5,30,9,pv,%d" % T0, "7,20,8,pv,%d" % (T0 + 1), "7,30,9,buy,%d" % (T0 + 2)])
  late = _write(tmp_path / "late.csv", ["7,30,9,pv,%d" % (T0 + 9000), "7,30,9,buy,%d" % (T0 + 9001)])
  cfg = DataConfig(train=f"taobao:{early}", eval=f"taobao:{late}", batch_size=1)
  tr, ev = open_train_eval(cfg)
  # per-file remaps would give late.csv's only user, item and category id 0, which early.csv gives user 5
  np.testing.assert_array_equal(tr.examples.data.sparse[:, :3, 0], [[5, 30, 9], [7, 20, 8]])
  np.testing.assert_array_equal(ev.examples.data.sparse[:, :3, 0], [[7, 30, 9]])


def test_taobao_id_beyond_int32_is_a_clear_error(tmp_path):
  path = _write(tmp_path / "ub.csv", ["1,10,7,pv,%d" % T0, "1,%d,7,pv,%d" % (2**31, T0)])
  with pytest.raises(DataFormatError, match=r"ub.csv:2: field item_id: id 2147483648 outside"):
    read_taobao_events(path)


@pytest.mark.parametrize("row, field", [
    ("1,10,7,click,1511600000", "behavior_type"),
    ("1,10,7,pv", "timestamp"),
    ("1,10,7,pv,1511600000,9", None),
    ("1,ten,7,pv,1511600000", "item_id"),
    ("1,10,7,pv,-1511600000", "timestamp"),
])
def test_taobao_bad_rows(tmp_path, row, field):
  path = _write(tmp_path / "ub.csv", ["1,10,7,pv,1511600000", row])
  with pytest.raises(DataFormatError) as exc:
    read_taobao_events(path)
  _check_error(exc, path, 2, field)


# --------------------------------------------------------------------------------------------
# Ali-CCP and AliExpress: made-up tables

_CCP_HEADER = "click,purchase,101,205,301,D508"


def test_aliccp_domains_and_vocab(tmp_path):
  path = _write(tmp_path / "ccp.csv", [_CCP_HEADER, "0,0,3,7,2,0.5", "1,0,1,2,5,0.25", "1,1,0,0,2,0.0"])
  ex = read_aliccp(path)
  assert [(f.name, f.vocab_size) for f in ex.schema.sparse] == [("101", 4), ("205", 8), ("301", 6)]
  assert ex.schema.dense == ("D508",) and ex.schema.num_domains == 2
  np.testing.assert_array_equal(ex.data.domain, [0, 1, 0])
  np.testing.assert_array_equal(ex.data.labels, [[0, 0], [1, 0], [1, 1]])
  fixed = read_aliccp(path, vocab_sizes={"205": 100}, domain_values=(5, 2, 9))
  assert fixed.schema.sparse[1].vocab_size == 100 and fixed.schema.num_domains == 3
  np.testing.assert_array_equal(fixed.data.domain, [1, 0, 1])
  with pytest.raises(DataFormatError, match="vocab_sizes") as exc:
    read_aliccp(path, vocab_sizes={"205": 5})
  _check_error(exc, path, 2, "205")
  with pytest.raises(DataFormatError, match="domain_values") as exc:
    read_aliccp(path, domain_values=(2,))
  _check_error(exc, path, 3, "301")
  with pytest.raises(ValueError, match="does not have"):
    read_aliccp(path, vocab_sizes={"999": 5})


@pytest.mark.parametrize("row, field", [
    ("0,0,3,7", "301"),
    ("0,0,3,7,2,0.5,9", None),
    ("0,2,3,7,2,0.5", "purchase"),
    ("0,0,3,-7,2,0.5", "205"),
    ("0,0,3,7.5,2,0.5", "205"),
    ("0,0,3,7,2,abc", "D508"),
    ("0,0,3,7,2,1e99", "D508"),
    ("0,0,3,7,2,inf", "D508"),
])
def test_aliccp_bad_rows(tmp_path, row, field):
  path = _write(tmp_path / "ccp.csv", [_CCP_HEADER, "0,0,3,7,2,0.5", row])
  with pytest.raises(DataFormatError) as exc:
    read_aliccp(path)
  _check_error(exc, path, 3, field)


def test_aliccp_missing_column(tmp_path):
  path = _write(tmp_path / "ccp.csv", ["click,101,301", "0,1,1"])
  with pytest.raises(DataFormatError, match="missing") as exc:
    read_aliccp(path)
  _check_error(exc, path, 1, "purchase")


def test_aliexpress_made_up(tmp_path):
  header = "search_id,categorical_1,categorical_2,numerical_1,click,conversion"
  path = _write(tmp_path / "ae.csv", [header, "5,1,0,0.5,1,0", "6,3,2,0.25,0,0"])
  ex = read_aliexpress(path, vocab_sizes={"categorical_1": 10})
  assert [(f.name, f.vocab_size) for f in ex.schema.sparse] == [("categorical_1", 10), ("categorical_2", 3)]
  np.testing.assert_array_equal(ex.data.labels, [[1, 0], [0, 0]])
  np.testing.assert_allclose(ex.data.dense[:, 0], [0.5, 0.25])
  bad = _write(tmp_path / "bad.csv", [header.replace("numerical_1", "price"), "5,1,0,0.5,1,0"])
  with pytest.raises(DataFormatError, match="unexpected column") as exc:
    read_aliexpress(bad)
  _check_error(exc, bad, 1, "price")
  bad_label = _write(tmp_path / "bad_label.csv", [header, "5,1,0,0.5,1,0", "5,1,0,0.5,1,-1"])
  with pytest.raises(DataFormatError) as exc:
    read_aliexpress(bad_label)
  _check_error(exc, bad_label, 3, "conversion")


def test_docstring_examples():
  assert doctest.testmod(criteo, raise_on_error=True).attempted > 0


def test_taobao_time_split_holds_out_the_latest_views(tmp_path):
  """--data.split_by time: @eval is the latest views of the log, @train the earlier, whatever the
  users; a random split, which would mix them (a user's later views, with the same look-ahead label,
  in training), is refused for taobao."""
  rows = [f"{u},{10 + k},7,pv,{T0 + 100 * k + u}" for u in range(1, 6) for k in range(4)]
  path = _write(tmp_path / "ub.csv", rows)
  cfg = DataConfig(train=f"taobao:{path}@train", batch_size=1, eval_fraction=0.25, split_by="time")
  tr, ev = open_train_eval(cfg)
  assert len(tr) == 15 and len(ev) == 5
  assert tr.examples.data.timestamp.max() < ev.examples.data.timestamp.min()
  np.testing.assert_array_equal(np.sort(ev.examples.data.sparse[:, 1, 0]), [13] * 5)  # every user's last view
  with pytest.raises(DataSpecError, match="pass --data.split_by time"):
    open_train_eval(dataclasses.replace(cfg, split_by="random"))


def test_taobao_same_second_pv_and_buy(tmp_path):
  """A buy in the same second as the pv is "at or after" it: the pv's buy label is 1, and the delay (0 s)
  is measured, as for a cart/fav in the same second (the real head has no such pair, so it cannot tell)."""
  path = _taobao_file(tmp_path, [(1, 10, 7, "pv", T0), (1, 10, 7, "buy", T0), (1, 10, 7, "fav", T0),
                                 (2, 11, 7, "pv", T0 + 5), (2, 11, 7, "buy", T0 + 4)])
  ev = read_taobao_events(path)
  np.testing.assert_array_equal(pv_to_buy_delays(ev), [0])  # user 2's buy came before its pv: left out
  np.testing.assert_array_equal(taobao_examples(ev).data.labels, [[1, 1], [0, 0]])


def test_aliccp_default_domains_are_the_sorted_scenarios(tmp_path):
  """Without domain_values, domain k is the k-th smallest value of field 301, not the k-th seen."""
  path = _write(tmp_path / "ccp.csv", [_CCP_HEADER, "0,0,3,7,5,0.5", "1,0,1,2,2,0.25", "1,1,0,0,9,0.0",
                                       "0,0,1,1,5,0.0"])
  np.testing.assert_array_equal(read_aliccp(path).data.domain, [1, 0, 2, 1])


def test_libfm_float_labels(tmp_path):
  """Labels written as floats map like their integer forms: 1.0 is a click, 0.0 and -1.0 are not."""
  path = _write(tmp_path / "f.libfm", ["1.0 0:1 5:1", "0.0 1:1 5:1", "-1.0 2:1 6:1", "+1 0:1 6:1"])
  np.testing.assert_array_equal(read_libfm(path).data.labels[:, 0], [1, 0, 0, 1])
