"""Plumbing shared by the readers: open a file, and turn bad values into DataFormatError.

Every helper that looks at one value takes `(path, line, field)` so its error names the place
(`PATH:LINE: field FIELD: what is wrong`). Line numbers are 1-based, as an editor shows them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxrec.data.batch import Batch, batch_from_numpy
from jaxrec.data.errors import DataFormatError

_F32_MAX = float(np.finfo(np.float32).max)


def read_lines(path: str | Path, *, encoding: str = "utf-8") -> list[str]:
  """The lines of a text file without their line endings (LF or CRLF).

  Trailing blank lines are dropped; `lines[i]` is line `i + 1` of the file. A missing, unreadable
  or empty file, or bytes that are not `encoding`, raise DataFormatError.
  """
  p = Path(path)
  if not p.exists():
    raise DataFormatError(str(p), None, None, "no such file")
  if p.is_dir():
    raise DataFormatError(str(p), None, None, "is a directory, expected a file")
  try:
    raw = p.read_bytes()
  except OSError as e:
    raise DataFormatError(str(p), None, None, f"cannot read: {e.strerror or e}") from None
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataFormatError(str(p), line, None, f"not valid {encoding} text ({e.reason})") from None
  lines = text.split("\n")
  lines = [s[:-1] if s.endswith("\r") else s for s in lines]
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise DataFormatError(str(p), None, None, "empty file")
  return lines


def to_int(s: str, path: str | Path, line: int, field: str) -> int:
  """A decimal integer; DataFormatError naming the place otherwise."""
  try:
    if "_" in s:
      raise ValueError
    return int(s)
  except ValueError:
    raise DataFormatError(str(path), line, field, f"expected an integer, got {s!r}") from None


def to_float(s: str, path: str | Path, line: int, field: str) -> float:
  """A finite float within float32 range; DataFormatError naming the place otherwise."""
  try:
    if "_" in s:
      raise ValueError
    v = float(s)
  except ValueError:
    raise DataFormatError(str(path), line, field, f"expected a number, got {s!r}") from None
  if not math.isfinite(v):
    raise DataFormatError(str(path), line, field, f"expected a finite number, got {s!r}")
  if abs(v) > _F32_MAX:
    raise DataFormatError(str(path), line, field, f"{s!r} is outside the float32 range")
  return v


def to_binary(s: str, path: str | Path, line: int, field: str) -> float:
  """A 0/1 label ("0", "1", "0.0", "1.0"); DataFormatError otherwise."""
  if s == "0" or s == "1":
    return float(s)
  try:
    v = float(s)
  except ValueError:
    v = math.nan
  if v != 0.0 and v != 1.0:
    raise DataFormatError(str(path), line, field, f"expected a 0/1 label, got {s!r}")
  return v


def to_index(s: str, path: str | Path, line: int, field: str) -> int:
  """A non-negative integer id that fits int32."""
  v = to_int(s, path, line, field)
  if not 0 <= v <= np.iinfo(np.int32).max:
    raise DataFormatError(str(path), line, field, f"id {v} outside [0, 2**31)")
  return v


def read_csv(path: str | Path, *, delimiter: str = ",") -> tuple[list[str], list[list[str]]]:
  """A CSV file with a header line and no quoting: (column names, rows of strings).

  Row `rows[i]` is line `i + 2`. Every row must have as many columns as the header; names are
  stripped of surrounding spaces and must be distinct and non-empty.
  """
  lines = read_lines(path)
  header = [h.strip() for h in lines[0].split(delimiter)]
  for j, h in enumerate(header):
    if not h:
      raise DataFormatError(str(path), 1, f"column {j + 1}", "empty column name in the header")
    if h in header[:j]:
      raise DataFormatError(str(path), 1, h, "column name appears twice in the header")
  rows = []
  for i, text in enumerate(lines[1:]):
    cols = text.split(delimiter)
    if len(cols) != len(header):
      field = header[len(cols)] if len(cols) < len(header) else None
      raise DataFormatError(str(path), i + 2, field, f"expected {len(header)} columns, got {len(cols)}")
    rows.append(cols)
  if not rows:
    raise DataFormatError(str(path), None, None, "no data rows after the header")
  return header, rows


def check_vocab_overrides(path: str | Path, names: list[str], vocab_sizes: dict[str, int] | None) -> dict[str, int]:
  """Validates a `vocab_sizes` argument against the sparse column names of a file."""
  vocab_sizes = dict(vocab_sizes or {})
  unknown = sorted(set(vocab_sizes) - set(names))
  if unknown:
    raise ValueError(f"{path}: vocab_sizes names features the file does not have: {unknown}")
  for name, size in vocab_sizes.items():
    if int(size) < 1:
      raise ValueError(f"{path}: vocab_sizes[{name!r}] must be >= 1, got {size}")
  return vocab_sizes


def vocab_for_column(path: str | Path, name: str, ids: np.ndarray, override: int | None,
                     first_line: int) -> int:
  """vocab_size of one id column [N]: `override` if given (ids must be below it), else max + 1.

  `first_line` is the file line of `ids[0]`; rows are assumed one per line after it.
  """
  top = int(ids.max()) if ids.size else 0
  if override is None:
    return top + 1
  if top >= override:
    row = int(np.argmax(ids >= override))
    raise DataFormatError(str(path), first_line + row, name,
                          f"id {int(ids[row])} >= vocab_sizes[{name!r}] = {override}")
  return int(override)


def one_hot_batch(*, dense: np.ndarray, ids: np.ndarray, mask: np.ndarray | None, labels: np.ndarray,
                  timestamp: np.ndarray, domain: np.ndarray | None = None) -> Batch:
  """A host Batch from one id per sparse feature: ids/mask [N, Fs] become [N, Fs, 1]."""
  n = labels.shape[0]
  if mask is None:
    mask = np.ones(ids.shape, np.bool_)
  return batch_from_numpy(
      dense=dense,
      sparse=ids[:, :, None],
      sparse_mask=mask[:, :, None],
      labels=labels,
      weights=np.ones(n, np.float32),
      domain=np.zeros(n, np.int32) if domain is None else domain,
      timestamp=timestamp,
      true_prob=None,
  )
