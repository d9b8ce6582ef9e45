"""Criteo display-ads logs: the Kaggle DAC TSV and DeepCTR's CSV sample.

Columns: `label I1..I13 C1..C26`. The label is 0/1; I are integer counts (may be empty or
negative); C are 32-bit hex hashes (may be empty).

Schema:
    dense   I1..I13                    log(1 + max(x, 0)); an empty value reads as 0
    sparse  C1..C26                    vocab_size None (hashed), max_len 1: id = int(hex, 16) &
                                       0x7FFFFFFF; an empty value is id 0 with mask False
    labels  ("click",)
    domain 0, timestamp = 0-based row number (the files hold no time), weight 1, true_prob None.

>>> from jaxrec.data.readers import criteo_schema
>>> s = criteo_schema()
>>> s.num_dense, s.num_sparse, s.labels
(13, 26, ('click',))
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from jaxrec.data.batch import Schema, SparseFeature
from jaxrec.data.errors import DataFormatError
from jaxrec.data.examples import Examples
from jaxrec.data.readers._common import one_hot_batch, read_lines, to_binary, to_float

DENSE = tuple(f"I{i}" for i in range(1, 14))
SPARSE = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label",) + DENSE + SPARSE
# Rows may have lost trailing empty fields (trailing tabs stripped upstream). In the Kaggle head
# they have 37 or 38 columns; rows with 37..39 are right-padded with empty fields.
MIN_COLUMNS = 37

_HEX = re.compile(r"[0-9a-fA-F]{1,8}")


def criteo_schema() -> Schema:
  return Schema(dense=DENSE, sparse=tuple(SparseFeature(c, None) for c in SPARSE), labels=("click",))


def read_criteo(path: str | Path, *, max_rows: int | None = None, delimiter: str = "\t") -> Examples:
  """Reads a Criteo file (TSV by default) into Examples: dense [N, 13], sparse [N, 26, 1].

  A first line whose first field is `label` is taken as a header; it must then name exactly
  `label,I1..I13,C1..C26`. Without a header the columns are in that order. Rows with 37..39
  columns are right-padded to 40 (missing trailing empty fields); other counts are errors.
  `max_rows` stops after that many data rows. Any bad value raises DataFormatError.
  """
  if max_rows is not None and max_rows < 1:
    raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
  lines = read_lines(path)
  start = 0
  if lines[0].split(delimiter)[0].strip().lower() == "label":
    names = tuple(c.strip() for c in lines[0].split(delimiter))
    if names != COLUMNS:
      bad = next((j for j, (a, b) in enumerate(zip(names, COLUMNS)) if a != b), min(len(names), len(COLUMNS)))
      got = names[bad] if bad < len(names) else "nothing"
      want = COLUMNS[bad] if bad < len(COLUMNS) else "nothing"
      raise DataFormatError(str(path), 1, "header", f"column {bad + 1} is {got!r}, expected {want!r} "
                            "(header must be label,I1..I13,C1..C26)")
    start = 1
  rows = lines[start:] if max_rows is None else lines[start:start + max_rows]
  n = len(rows)
  if n == 0:
    raise DataFormatError(str(path), None, None, "no data rows after the header")

  labels = np.empty((n, 1), np.float32)
  dense = np.zeros((n, len(DENSE)), np.float32)
  ids = np.zeros((n, len(SPARSE)), np.int64)
  mask = np.zeros((n, len(SPARSE)), np.bool_)
  for r, text in enumerate(rows):
    line = start + r + 1
    cols = text.split(delimiter)
    if not MIN_COLUMNS <= len(cols) <= len(COLUMNS):
      field = COLUMNS[len(cols)] if len(cols) < len(COLUMNS) else None
      hint = f" (is the delimiter {delimiter!r} right?)" if len(cols) == 1 else ""
      raise DataFormatError(str(path), line, field, f"expected {len(COLUMNS)} columns ({MIN_COLUMNS}.."
                            f"{len(COLUMNS) - 1} if trailing empty fields were dropped), got {len(cols)}{hint}")
    cols.extend([""] * (len(COLUMNS) - len(cols)))
    labels[r, 0] = to_binary(cols[0].strip(), path, line, "label")
    for j in range(len(DENSE)):
      s = cols[1 + j].strip()
      if s:
        dense[r, j] = math.log1p(max(to_float(s, path, line, DENSE[j]), 0.0))
    for j in range(len(SPARSE)):
      s = cols[1 + len(DENSE) + j].strip()
      if s:
        if _HEX.fullmatch(s) is None:
          raise DataFormatError(str(path), line, SPARSE[j], f"expected a hex hash of at most 8 digits, got {s!r}")
        ids[r, j] = int(s, 16) & 0x7FFFFFFF
        mask[r, j] = True
  data = one_hot_batch(dense=dense, ids=ids, mask=mask, labels=labels, timestamp=np.arange(n))
  return Examples(criteo_schema(), data, str(path))


def read_criteo_csv(path: str | Path, *, max_rows: int | None = None) -> Examples:
  """`read_criteo` for comma-separated files such as DeepCTR's `criteo_sample.txt` (with header)."""
  return read_criteo(path, max_rows=max_rows, delimiter=",")
