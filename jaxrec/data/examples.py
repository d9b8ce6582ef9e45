"""Examples: a whole (small) dataset held in host memory as one numpy Batch plus its Schema.

Readers of the real formats return Examples; `jaxrec.data.pipeline` turns them into fixed-shape
batches. `split` gives the seeded train/eval split used for the datasets that ship as one file.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data.batch import Batch, Schema
from jaxrec.data.errors import DataSpecError


@dataclasses.dataclass(frozen=True)
class Examples:
  schema: Schema
  data: Batch  # numpy arrays with leading dimension N
  source: str = ""  # where they came from (path), for messages

  def __post_init__(self):
    self.validate()

  def __len__(self) -> int:
    return int(self.data.labels.shape[0])

  def validate(self) -> None:
    """Checks shapes and value ranges against the schema; raises ValueError naming the field."""
    s, d, n = self.schema, self.data, self.data.labels.shape[0]
    want = {
        "dense": (n, s.num_dense),
        "sparse": (n, s.num_sparse, s.max_len),
        "sparse_mask": (n, s.num_sparse, s.max_len),
        "labels": (n, s.num_tasks),
        "weights": (n,),
        "domain": (n,),
        "timestamp": (n,),
    }
    if d.true_prob is not None:
      want["true_prob"] = (n, s.num_tasks)
    for name, shape in want.items():
      got = getattr(d, name).shape
      if got != shape:
        raise ValueError(f"{self.source or 'examples'}: field {name} has shape {got}, schema wants {shape}")
    if not np.all(np.isfinite(d.dense)):
      raise ValueError(f"{self.source or 'examples'}: field dense holds NaN or inf")
    if np.any(d.sparse < 0):
      raise ValueError(f"{self.source or 'examples'}: field sparse holds negative ids")
    for j, f in enumerate(s.sparse):
      if f.vocab_size is not None:
        ids = d.sparse[:, j][d.sparse_mask[:, j]]
        if ids.size and ids.max() >= f.vocab_size:
          raise ValueError(f"{self.source or 'examples'}: feature {f.name} has id {ids.max()} >= vocab_size {f.vocab_size}")
    if np.any((d.labels != 0) & (d.labels != 1)):
      raise ValueError(f"{self.source or 'examples'}: field labels holds values other than 0 and 1")
    if np.any((d.domain < 0) | (d.domain >= s.num_domains)):
      raise ValueError(f"{self.source or 'examples'}: field domain outside [0, {s.num_domains})")

  def rows(self, idx: np.ndarray) -> Batch:
    """The rows `idx` (any integer index array) as a host Batch (no re-validation)."""
    return Batch(**{f.name: (None if getattr(self.data, f.name) is None else getattr(self.data, f.name)[idx])
                    for f in dataclasses.fields(Batch)})

  def take(self, idx: np.ndarray) -> "Examples":
    """The rows `idx` (any integer index array), as new Examples."""
    return Examples(self.schema, self.rows(idx), self.source)

  def split(self, eval_fraction: float = 0.2, seed: int = 0) -> tuple["Examples", "Examples"]:
    """A seeded random (train, eval) split; the same seed always gives the same rows.

    Raises DataSpecError when either side would be empty (too few rows for `eval_fraction`).
    """
    n_eval = self._eval_rows(eval_fraction)
    perm = np.random.default_rng(seed).permutation(len(self))
    return self.take(np.sort(perm[n_eval:])), self.take(np.sort(perm[:n_eval]))

  def time_split(self, eval_fraction: float = 0.2) -> tuple["Examples", "Examples"]:
    """(train, eval) with eval the latest `eval_fraction` of rows by timestamp (stable order; rows
    sharing the boundary timestamp can fall on both sides). DataSpecError as `split`."""
    n_eval = self._eval_rows(eval_fraction)
    order = np.argsort(self.data.timestamp, kind="stable")
    return self.take(order[: len(self) - n_eval]), self.take(order[len(self) - n_eval:])

  def _eval_rows(self, eval_fraction: float) -> int:
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = int(round(len(self) * eval_fraction))
    if not 0 < n_eval < len(self):
      empty = "eval" if n_eval == 0 else "train"
      raise DataSpecError(f"{self.source or 'examples'}: an eval fraction of {eval_fraction:g} of its {len(self)} rows "
                          f"leaves the {empty} split empty; change --data.eval_fraction or use more rows")
    return n_eval
