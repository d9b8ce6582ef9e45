"""MovieLens 100K (`ml-100k/`): ratings joined with user and movie side information.

Files: `u.data` (TAB: user item rating unix_ts), `u.user` (`id|age|gender|occupation|zip`),
`u.item` (`id|title|release_date|video_release_date|url|19 genre flags`, Latin-1).

One example per rating, in `u.data` order. Label "click" = rating >= 4 (the usual binarised CTR
task, about 55% positive).

Schema:
    dense   age           age / 100
            release_year  (year - 1900) / 100; the mean of the known years when the date is empty
    sparse  user_id       raw id, vocab max user id + 1 (0 unused)
            item_id       raw id, vocab max item id + 1 (0 unused)
            age_bucket    7 ML-1M style buckets: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
            gender        M=0, F=1
            occupation    index in the sorted distinct occupations of u.user (21 for ml-100k)
            zip_region    first zip character: a digit 0..9, or 10 for a non-digit (Canada etc.)
            zip3          index in the sorted distinct first-3 zip characters (upper-cased) of u.user
                          (382 for ml-100k; hashing them into 1024 buckets merged 72 of them)
            release_year_bucket  10 buckets: <1950, 1950s, 60s, 70s, 80s, 1990-93, 1994, 1995,
                          1996, 1997+; masked when the release date is empty
            genres        multi-hot genre ids 0..18 (u.genre order), max_len = most genres of any
                          movie (6 in ml-100k), padding masked
    labels  ("click",)
    domain 0, timestamp = the rating's Unix time, weight 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxrec.data.batch import Schema, SparseFeature, batch_from_numpy
from jaxrec.data.errors import DataFormatError
from jaxrec.data.examples import Examples
from jaxrec.data.readers._common import read_lines, to_index, to_int

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "War", "Western")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bucket b holds ages in [edge[b-1], edge[b])
YEAR_EDGES = (1950, 1960, 1970, 1980, 1990, 1994, 1995, 1996, 1997)

_USER_COLS = ("user_id", "age", "gender", "occupation", "zip")
_ITEM_COLS = ("item_id", "title", "release_date", "video_release_date", "url") + tuple(f"genre_{g}" for g in GENRES)
_DATA_COLS = ("user_id", "item_id", "rating", "timestamp")


def _split(text: str, sep: str, cols: tuple[str, ...], path: Path, line: int) -> list[str]:
  parts = text.split(sep)
  if len(parts) != len(cols):
    field = cols[len(parts)] if len(parts) < len(cols) else None
    raise DataFormatError(str(path), line, field, f"expected {len(cols)} {sep!r}-separated columns, got {len(parts)}")
  return parts


def _check_unique(path: Path, name: str, ids: list[int]) -> None:
  seen: set[int] = set()
  for i, v in enumerate(ids):
    if v in seen:
      raise DataFormatError(str(path), i + 1, name, f"id {v} appears twice")
    seen.add(v)


def _read_users(path: Path) -> dict[str, np.ndarray]:
  """Per-user arrays indexed by raw user id (length max id + 1); `known` marks ids present."""
  rows = [_split(t, "|", _USER_COLS, path, i + 1) for i, t in enumerate(read_lines(path))]
  uid = [to_index(r[0], path, i + 1, "user_id") for i, r in enumerate(rows)]
  _check_unique(path, "user_id", uid)
  occupations = sorted({r[3].strip() for r in rows})
  zip3 = {z: k for k, z in enumerate(sorted({r[4].strip().upper()[:3] for r in rows if r[4].strip()}))}
  size = max(uid) + 1
  out = {k: np.zeros(size, np.int64) for k in ("age", "gender", "occupation", "zip_region", "zip3")}
  out["known"] = np.zeros(size, np.bool_)
  out["zip_mask"] = np.zeros(size, np.bool_)
  for i, (u, r) in enumerate(zip(uid, rows)):
    age = to_int(r[1], path, i + 1, "age")
    if not 0 <= age <= 150:
      raise DataFormatError(str(path), i + 1, "age", f"age {age} outside [0, 150]")
    gender = r[2].strip().upper()
    if gender not in ("M", "F"):
      raise DataFormatError(str(path), i + 1, "gender", f"expected M or F, got {r[2]!r}")
    if not r[3].strip():
      raise DataFormatError(str(path), i + 1, "occupation", "empty occupation")
    zip_code = r[4].strip().upper()
    out["known"][u] = True
    out["age"][u] = age
    out["gender"][u] = int(gender == "F")
    out["occupation"][u] = occupations.index(r[3].strip())
    if zip_code:
      out["zip_mask"][u] = True
      out["zip_region"][u] = int(zip_code[0]) if zip_code[0] in "0123456789" else 10
      out["zip3"][u] = zip3[zip_code[:3]]
  out["num_occupations"] = np.asarray(len(occupations))
  out["num_zip3"] = np.asarray(max(1, len(zip3)))
  return out


def _read_items(path: Path) -> dict[str, np.ndarray]:
  """Per-item arrays indexed by raw item id; `genres` [I, G] and `genre_mask` [I, G] left-packed."""
  rows = [_split(t, "|", _ITEM_COLS, path, i + 1) for i, t in enumerate(read_lines(path, encoding="latin-1"))]
  iid = [to_index(r[0], path, i + 1, "item_id") for i, r in enumerate(rows)]
  _check_unique(path, "item_id", iid)
  size = max(iid) + 1
  flags = np.zeros((size, len(GENRES)), np.bool_)
  year = np.zeros(size, np.int64)
  has_year = np.zeros(size, np.bool_)
  known = np.zeros(size, np.bool_)
  for i, (m, r) in enumerate(zip(iid, rows)):
    known[m] = True
    date = r[2].strip()
    if date:
      parts = date.split("-")
      if len(parts) != 3 or len(parts[2]) != 4:
        raise DataFormatError(str(path), i + 1, "release_date", f"expected DD-Mon-YYYY, got {date!r}")
      year[m] = to_int(parts[2], path, i + 1, "release_date")
      has_year[m] = True
    for g in range(len(GENRES)):
      s = r[5 + g].strip()
      if s not in ("0", "1"):
        raise DataFormatError(str(path), i + 1, _ITEM_COLS[5 + g], f"expected a 0/1 genre flag, got {s!r}")
      flags[m, g] = s == "1"
  max_len = max(1, int(flags.sum(axis=1).max()))
  # Left-pack the genre ids of each movie: stable argsort puts set flags first, in genre order.
  order = np.argsort(~flags, axis=1, kind="stable")[:, :max_len]
  genre_mask = np.take_along_axis(flags, order, axis=1)
  genres = np.where(genre_mask, order, 0)
  return {"known": known, "year": year, "has_year": has_year, "genres": genres, "genre_mask": genre_mask}


def read_ratings(path: Path) -> np.ndarray:
  """u.data as int64 [N, 4]: user, item, rating, timestamp."""
  lines = read_lines(path)
  out = np.empty((len(lines), 4), np.int64)
  for i, text in enumerate(lines):
    parts = _split(text, "\t", _DATA_COLS, path, i + 1)
    try:
      out[i] = [int(p) for p in parts]
    except (ValueError, OverflowError):
      for name, p in zip(_DATA_COLS, parts):
        to_int(p, path, i + 1, name)
      raise DataFormatError(str(path), i + 1, None, "value outside int64") from None
  for j, name in enumerate(_DATA_COLS):
    lo, hi = (1, 5) if name == "rating" else (0, np.iinfo(np.int32).max)
    bad = (out[:, j] < lo) | (out[:, j] > hi)
    if bad.any():
      r = int(np.argmax(bad))
      raise DataFormatError(str(path), r + 1, name, f"value {int(out[r, j])} outside [{lo}, {hi}]")
  return out


def read_movielens(dir_path: str | Path) -> Examples:
  """Reads an ml-100k folder into Examples: dense [N, 2], sparse [N, 9, L] (L = genres max_len)."""
  d = Path(dir_path)
  if not d.is_dir():
    raise DataFormatError(str(d), None, None, "no such directory (expected the ml-100k folder)")
  users = _read_users(d / "u.user")
  items = _read_items(d / "u.item")
  ratings = read_ratings(d / "u.data")
  u, m = ratings[:, 0], ratings[:, 1]
  for col, ids, table, name in ((0, u, users, "user_id"), (1, m, items, "item_id")):
    bad = ids >= table["known"].shape[0]
    bad[~bad] = ~table["known"][ids[~bad]]
    if bad.any():
      r = int(np.argmax(bad))
      src = "u.user" if col == 0 else "u.item"
      raise DataFormatError(str(d / "u.data"), r + 1, name, f"id {int(ids[r])} is not in {src}")

  n = ratings.shape[0]
  years = items["year"][items["has_year"]]
  mean_year = float(years.mean()) if years.size else 1990.0
  item_year = np.where(items["has_year"], items["year"], mean_year)
  dense = np.stack([users["age"][u] / 100.0, (item_year[m] - 1900.0) / 100.0], axis=1)

  genres, genre_mask = items["genres"][m], items["genre_mask"][m]
  max_len = genres.shape[1]
  one_hot = {
      "user_id": (u, None, users["known"].shape[0]),
      "item_id": (m, None, items["known"].shape[0]),
      "age_bucket": (np.searchsorted(AGE_EDGES, users["age"][u], side="right"), None, len(AGE_EDGES) + 1),
      "gender": (users["gender"][u], None, 2),
      "occupation": (users["occupation"][u], None, int(users["num_occupations"])),
      "zip_region": (users["zip_region"][u], users["zip_mask"][u], 11),
      "zip3": (users["zip3"][u], users["zip_mask"][u], int(users["num_zip3"])),
      "release_year_bucket": (np.searchsorted(YEAR_EDGES, items["year"][m], side="right"),
                              items["has_year"][m], len(YEAR_EDGES) + 1),
  }
  names = list(one_hot) + ["genres"]
  sparse = np.zeros((n, len(names), max_len), np.int64)
  mask = np.zeros((n, len(names), max_len), np.bool_)
  features = []
  for j, (name, (ids, fmask, vocab)) in enumerate(one_hot.items()):
    fmask = np.ones(n, np.bool_) if fmask is None else fmask
    sparse[:, j, 0] = np.where(fmask, ids, 0)
    mask[:, j, 0] = fmask
    features.append(SparseFeature(name, vocab))
  sparse[:, -1], mask[:, -1] = genres, genre_mask
  features.append(SparseFeature("genres", len(GENRES), max_len))

  schema = Schema(dense=("age", "release_year"), sparse=tuple(features), labels=("click",))
  data = batch_from_numpy(
      dense=dense,
      sparse=sparse,
      sparse_mask=mask,
      labels=(ratings[:, 2:3] >= 4),
      weights=np.ones(n),
      domain=np.zeros(n),
      timestamp=ratings[:, 3],
      true_prob=None,
  )
  return Examples(schema, data, str(d))
