"""libFM one-hot files, as NFM ships Frappe: `label idx:1 idx:1 ...` per line.

Every row has the same number K of active indices, sorted ascending, one per field; the field of
an index is its position in the row. Labels: `1` -> 1; `-1` or `0` -> 0 (Frappe's -1 rows are
negatives sampled by the NFM authors). Values other than 1 are errors (one-hot only).

Schema:
    dense   ()
    sparse  one feature per field, max_len 1. The id is the GLOBAL libFM index (not remapped per
            field), so every field has the same vocab_size: max index in the file + 1, or the
            `vocab_size` argument (pass it so that files of one dataset agree, e.g. 5382 for Frappe).
            Names: `field_names`, else FRAPPE_FIELDS when K = 10, else f0..f{K-1}.
    labels  ("click",)
    domain 0, timestamp = 0-based row number, weight 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrec.data.batch import Schema, SparseFeature
from jaxrec.data.errors import DataFormatError
from jaxrec.data.examples import Examples
from jaxrec.data.readers._common import one_hot_batch, read_lines, to_float, to_index

# Field order of the NFM Frappe files (frappe/README.txt, minus the `cnt` field they drop).
FRAPPE_FIELDS = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
                 "country", "city")
FRAPPE_NUM_FEATURES = 5382

_LABELS = {"1": 1.0, "+1": 1.0, "-1": 0.0, "0": 0.0}


def _label(s: str, path: str | Path, line: int) -> float:
  v = _LABELS.get(s)
  if v is None:
    v = to_float(s, path, line, "label")
    if v not in (1.0, -1.0, 0.0):
      raise DataFormatError(str(path), line, "label", f"expected 1, -1 or 0, got {s!r}")
    v = float(v == 1.0)
  return v


def read_libfm(path: str | Path, *, field_names: Sequence[str] | None = None,
               vocab_size: int | None = None) -> Examples:
  """Reads a one-hot libFM file into Examples with sparse [N, K, 1] global indices.

  Raises DataFormatError for a bad label, an `idx:val` pair that does not parse, a value other
  than 1, indices not strictly ascending, a row with a different K than the first row, or an
  index >= `vocab_size`.
  """
  lines = read_lines(path)
  n = len(lines)
  labels = np.empty((n, 1), np.float32)
  ids: np.ndarray | None = None
  names: tuple[str, ...] = ()
  k = 0
  for i, text in enumerate(lines):
    line = i + 1
    toks = text.split()
    if not toks:
      raise DataFormatError(str(path), line, "label", "empty line")
    labels[i, 0] = _label(toks[0], path, line)
    if ids is None:
      k = len(toks) - 1
      if k == 0:
        raise DataFormatError(str(path), line, None, "row has no idx:value features")
      if field_names is None:
        names = FRAPPE_FIELDS if k == len(FRAPPE_FIELDS) else tuple(f"f{j}" for j in range(k))
      else:
        names = tuple(field_names)
        if len(names) != k:
          raise DataFormatError(str(path), line, None, f"row has {k} features but field_names names {len(names)}")
      ids = np.empty((n, k), np.int64)
    elif len(toks) - 1 != k:
      field = names[len(toks) - 1] if len(toks) - 1 < k else None
      raise DataFormatError(str(path), line, field, f"row has {len(toks) - 1} features, the first row has {k}")
    row = ids[i]
    prev = -1
    for j in range(k):
      idx, sep, val = toks[j + 1].partition(":")
      if not sep:
        raise DataFormatError(str(path), line, names[j], f"expected idx:value, got {toks[j + 1]!r}")
      if val != "1" and to_float(val, path, line, names[j]) != 1.0:
        raise DataFormatError(str(path), line, names[j], f"value {val!r} is not 1 (only one-hot libFM is supported)")
      v = to_index(idx, path, line, names[j])
      if v <= prev:
        raise DataFormatError(str(path), line, names[j], f"index {v} not above the previous index {prev} "
                              "(indices must be sorted ascending, one per field)")
      row[j] = prev = v
  assert ids is not None
  top = int(ids.max())
  if vocab_size is None:
    vocab_size = top + 1
  elif top >= vocab_size:
    r, j = np.unravel_index(int(np.argmax(ids >= vocab_size)), ids.shape)
    raise DataFormatError(str(path), int(r) + 1, names[j], f"index {int(ids[r, j])} >= vocab_size {vocab_size}")
  schema = Schema(dense=(), sparse=tuple(SparseFeature(f, int(vocab_size)) for f in names), labels=("click",))
  data = one_hot_batch(dense=np.zeros((n, 0), np.float32), ids=ids, mask=None, labels=labels,
                       timestamp=np.arange(n))
  return Examples(schema, data, str(path))
