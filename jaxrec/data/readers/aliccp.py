"""Two-task Alibaba logs, as torch-rechub / MTReclib / FuxiCTR ship them: CSV with a header.

Ali-CCP (`read_aliccp`): labels `click,purchase`; dense columns start with "D"; every other
column is a label-encoded sparse field (101 user, 205 item, 301 scenario, ...). Field 301 is also
the domain: `Batch.domain` is the index of its value in `domain_values` (default: the sorted
distinct values of the file), and num_domains = len(domain_values). A train and an eval file read
apart number their own scenarios: `align_aliccp_domains` renumbers both over their union (as
`jaxrec.data.sources.open_train_eval` does).

AliExpress (`read_aliexpress`): `search_id, categorical_1..16, numerical_1..63, click, conversion`.
`search_id` (a query/session id) is not used as a feature.

Vocabulary: sparse ids are used as they are (no hashing); each feature's vocab_size is the file's
max id + 1 unless `vocab_sizes` overrides it. Train and eval files must agree, so pass the same
`vocab_sizes` to every split, e.g. the max over all splits of a first read:
    sizes = {f.name: max(a.vocab_size, b.vocab_size) for a, b in zip(tr.schema.sparse, ev.schema.sparse)}
An id at or above an override is a DataFormatError naming its line. (`--data.train` / `--data.eval`
do this for you: `jaxrec.data.sources.open_train_eval` gives both splits the larger vocabulary.)

Both: dense values as they are (already normalised upstream; must be finite), labels 0/1,
timestamp = 0-based row number (the files hold no time), weight 1, max_len 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrec.data.batch import Schema, SparseFeature
from jaxrec.data.errors import DataFormatError
from jaxrec.data.examples import Examples
from jaxrec.data.readers._common import (check_vocab_overrides, one_hot_batch, read_csv, to_binary, to_float,
                                         to_index, vocab_for_column)

ALICCP_LABELS = ("click", "purchase")
ALICCP_DOMAIN_FIELD = "301"
ALIEXPRESS_LABELS = ("click", "conversion")


def _table(path: str | Path, header: list[str], rows: list[list[str]], labels: Sequence[str],
           sparse: Sequence[str], dense: Sequence[str], vocab_sizes: dict[str, int] | None):
  """Parses the columns of a CSV table: (labels [N, T], ids [N, Fs], dense [N, Fd], features)."""
  overrides = check_vocab_overrides(path, list(sparse), vocab_sizes)
  col = {h: j for j, h in enumerate(header)}
  n = len(rows)
  y = np.empty((n, len(labels)), np.float32)
  ids = np.empty((n, len(sparse)), np.int64)
  x = np.empty((n, len(dense)), np.float32)
  for i, row in enumerate(rows):
    line = i + 2
    for t, name in enumerate(labels):
      y[i, t] = to_binary(row[col[name]].strip(), path, line, name)
    for j, name in enumerate(sparse):
      ids[i, j] = to_index(row[col[name]].strip(), path, line, name)
    for j, name in enumerate(dense):
      x[i, j] = to_float(row[col[name]].strip(), path, line, name)
  features = tuple(SparseFeature(name, vocab_for_column(path, name, ids[:, j], overrides.get(name), 2))
                   for j, name in enumerate(sparse))
  return y, ids, x, features


def _require(path: str | Path, header: list[str], names: Sequence[str]) -> None:
  for name in names:
    if name not in header:
      raise DataFormatError(str(path), 1, name, "column missing from the header")


def read_aliccp(path: str | Path, *, vocab_sizes: dict[str, int] | None = None,
                domain_values: Sequence[int] | None = None) -> Examples:
  """Reads an Ali-CCP CSV into Examples: dense [N, #D columns], sparse [N, #fields, 1], labels [N, 2].

  `domain_values`: the raw values of field 301, in domain-id order; pass the same tuple for every
  split. A value not listed is a DataFormatError.
  """
  header, rows = read_csv(path)
  _require(path, header, ALICCP_LABELS + (ALICCP_DOMAIN_FIELD,))
  dense = [h for h in header if h.startswith("D")]
  sparse = [h for h in header if h not in ALICCP_LABELS and not h.startswith("D")]
  y, ids, x, features = _table(path, header, rows, ALICCP_LABELS, sparse, dense, vocab_sizes)

  raw = ids[:, sparse.index(ALICCP_DOMAIN_FIELD)].tolist()
  values = sorted(set(raw)) if domain_values is None else [int(v) for v in domain_values]
  if len(set(values)) != len(values):
    raise ValueError(f"{path}: domain_values must be distinct, got {tuple(domain_values or ())}")
  index = {v: k for k, v in enumerate(values)}
  domain = np.empty(len(raw), np.int64)
  for r, v in enumerate(raw):
    k = index.get(v)
    if k is None:
      raise DataFormatError(str(path), r + 2, ALICCP_DOMAIN_FIELD, f"scenario {v} not in domain_values {tuple(values)}")
    domain[r] = k

  schema = Schema(dense=tuple(dense), sparse=features, labels=ALICCP_LABELS, num_domains=max(1, len(values)))
  data = one_hot_batch(dense=x, ids=ids, mask=None, labels=y, timestamp=np.arange(len(rows)), domain=domain)
  return Examples(schema, data, str(path))


def align_aliccp_domains(a: Examples, b: Examples) -> tuple[Examples, Examples]:
  """Two Ali-CCP files (train and eval) with their domains numbered over the union of their
  scenarios (field 301, sorted): read alone, each file numbers only the scenarios it holds, so a
  scenario missing from one shifted the other's domain ids and num_domains."""
  j = [f.name for f in a.schema.sparse].index(ALICCP_DOMAIN_FIELD)
  values = np.union1d(a.data.sparse[:, j, 0], b.data.sparse[:, j, 0])

  def renumber(ex: Examples) -> Examples:
    domain = np.searchsorted(values, ex.data.sparse[:, j, 0]).astype(ex.data.domain.dtype)
    schema = dataclasses.replace(ex.schema, num_domains=max(1, len(values)))
    return Examples(schema, ex.data.replace(domain=domain), ex.source)

  return renumber(a), renumber(b)


def read_aliexpress(path: str | Path, *, vocab_sizes: dict[str, int] | None = None) -> Examples:
  """Reads an AliExpress CSV into Examples: dense [N, 63], sparse [N, 16, 1], labels [N, 2].

  Sparse are the `categorical_*` columns and dense the `numerical_*` columns, in header order;
  `search_id` is ignored; any other column is a DataFormatError.
  """
  header, rows = read_csv(path)
  _require(path, header, ALIEXPRESS_LABELS)
  sparse = [h for h in header if h.startswith("categorical_")]
  dense = [h for h in header if h.startswith("numerical_")]
  for h in header:
    if h not in sparse and h not in dense and h not in ALIEXPRESS_LABELS and h != "search_id":
      raise DataFormatError(str(path), 1, h, "unexpected column (want search_id, categorical_*, numerical_*, "
                            "click, conversion)")
  y, ids, x, features = _table(path, header, rows, ALIEXPRESS_LABELS, sparse, dense, vocab_sizes)
  schema = Schema(dense=tuple(dense), sparse=features, labels=ALIEXPRESS_LABELS)
  data = one_hot_batch(dense=x, ids=ids, mask=None, labels=y, timestamp=np.arange(len(rows)))
  return Examples(schema, data, str(path))
