"""Evaluation metrics for binary (CTR-style) predictions, computed with numpy on the host.

Inputs, all 1-D of the same length N (any shape is flattened):

    y  labels in {0, 1}
    p  predicted probabilities in [0, 1]
    w  example weights >= 0 (None = all ones); weight 0 marks a padding row, which is ignored

Metrics (weighted sums run over the rows with w > 0):

    log_loss            -sum w (y log p + (1 - y) log(1 - p)) / sum w, with p clipped to [1e-7, 1 - 1e-7]
    normalized_entropy  log_loss / H(base rate), H the binary entropy of sum(w y) / sum(w)
                        (He et al. 2014, "Practical lessons from predicting clicks on ads at Facebook");
                        1.0 is the constant base-rate predictor, lower is better
    auc                 weighted ROC AUC: P(p_pos > p_neg) + 0.5 P(p_pos == p_neg) over weighted pairs
    calibration         sum(w p) / sum(w y); 1.0 is calibrated, > 1 over-predicts

Undefined cases (no rows, base rate 0 or 1, no positives) raise `UndefinedMetricError`, a ValueError;
malformed input (labels not 0/1, probabilities NaN or outside [0, 1], negative weights) a plain ValueError.

`MetricAccumulator` collects `[B, T]` batches during an evaluation and reports every metric per task:

>>> acc = MetricAccumulator(("click",))
>>> acc.add(np.array([[1.0], [0.0]]), np.array([[0.8], [0.3]]), np.array([1.0, 1.0]))
>>> acc.result()["click/auc"]
1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] inside the logarithms


class UndefinedMetricError(ValueError):
  """The metric has no value on these rows (no rows, or a single class where it needs both)."""


def _prepare(y, p, w, fn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flattens to float64, checks values, drops weight-0 rows. Raises ValueError naming `fn`."""
  y = np.asarray(y, dtype=np.float64).ravel()
  p = np.asarray(p, dtype=np.float64).ravel()
  if y.shape != p.shape:
    raise ValueError(f"{fn}: labels have {y.size} values but probabilities have {p.size}")
  if w is None:
    w = np.ones_like(y)
  else:
    w = np.asarray(w, dtype=np.float64).ravel()
    if w.shape != y.shape:
      raise ValueError(f"{fn}: weights have {w.size} values but labels have {y.size}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
      raise ValueError(f"{fn}: weights must be finite and >= 0")
    keep = w > 0
    if not keep.all():
      y, p, w = y[keep], p[keep], w[keep]
  if y.size == 0:
    raise UndefinedMetricError(f"{fn}: no rows with positive weight; the metric is undefined")
  if np.any((y != 0) & (y != 1)):
    raise ValueError(f"{fn}: labels must be 0 or 1")
  if not np.all((p >= 0) & (p <= 1)):  # also catches NaN
    raise ValueError(f"{fn}: probabilities must lie in [0, 1] (found NaN or a value outside)")
  return y, p, w


def _log_loss(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
  p = np.clip(p, EPS, 1 - EPS)
  ll = -(y * np.log(p) + (1 - y) * np.log1p(-p))
  return float(np.dot(w, ll) / w.sum())


def _base_rate_entropy(y: np.ndarray, w: np.ndarray, fn: str) -> float:
  rate = float(np.dot(w, y) / w.sum())
  if rate <= 0 or rate >= 1:
    raise UndefinedMetricError(
        f"{fn}: the weighted base rate is {rate:g} (all labels are {int(rate)}), so its entropy is 0 and "
        "normalized entropy is undefined")
  return -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate))


def log_loss(y, p, w=None) -> float:
  """Weighted mean binary cross-entropy in nats, p clipped to [1e-7, 1 - 1e-7]."""
  return _log_loss(*_prepare(y, p, w, "log_loss"))


def normalized_entropy(y, p, w=None) -> float:
  """log_loss divided by the entropy of the weighted base rate; 1.0 = predicting the base rate.

  Raises ValueError when the base rate is 0 or 1 (every label the same), where NE is undefined.
  """
  y, p, w = _prepare(y, p, w, "normalized_entropy")
  return _log_loss(y, p, w) / _base_rate_entropy(y, w, "normalized_entropy")


def auc(y, p, w=None) -> float:
  """Exact weighted ROC AUC; tied scores count one half. O(N log N) (one sort).

  Equals sum over (positive i, negative j) of w_i w_j ([p_i > p_j] + 0.5 [p_i == p_j]), divided by
  (sum of positive weights) * (sum of negative weights). Raises ValueError without both classes.
  """
  y, p, w = _prepare(y, p, w, "auc")
  scores, group = np.unique(p, return_inverse=True)  # sorted distinct scores; group[i] = rank of p[i]
  pos = np.bincount(group, weights=w * y, minlength=scores.size)
  neg = np.bincount(group, weights=w * (1 - y), minlength=scores.size)
  total_pos, total_neg = pos.sum(), neg.sum()
  if total_pos == 0 or total_neg == 0:
    missing = "positive" if total_pos == 0 else "negative"
    raise UndefinedMetricError(f"auc: needs both positive and negative labels, got no {missing} ones")
  # Negative weight strictly below / above each score group (exclusive cumulative sums, so that a perfect
  # ranking sums exact zeros and gives exactly 1.0).
  neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
  neg_above = np.concatenate([np.cumsum(neg[::-1])[::-1][1:], [0.0]])
  right = np.dot(pos, neg_below + 0.5 * neg)
  wrong = np.dot(pos, neg_above + 0.5 * neg)
  return float(right / (right + wrong))


def calibration(y, p, w=None) -> float:
  """sum(w p) / sum(w y): predicted over observed positives. Raises ValueError without positives."""
  y, p, w = _prepare(y, p, w, "calibration")
  observed = float(np.dot(w, y))
  if observed == 0:
    raise UndefinedMetricError("calibration: no positive labels, so predicted / observed is undefined")
  return float(np.dot(w, p)) / observed


def _undefined_to_nan(fn, *args) -> float:
  try:
    return fn(*args)
  except UndefinedMetricError:
    return float("nan")


class MetricAccumulator:
  """Collects `[B, T]` eval batches and reports every metric per task.

  `add(labels, probs, weights, true_probs=None)`:
    labels, probs   [B, T] (or [B] when there is one task)
    weights         [B] (shared by the tasks) or [B, T]; 0 marks padding rows; None = all ones
    true_probs      [B, T] the known label probabilities (synthetic data); give them on every add or
                    on none, so the oracle metric covers the same rows

  `result()` returns, for each task name t:
    t/logloss, t/ne, t/auc, t/calibration   the metrics above
    t/count                                 number of rows with weight > 0
    t/base_rate                             weighted mean label
    t/oracle_ne                             NE of true_probs on the same rows (only when given)
  A metric that is undefined for the collected rows (no positives, say) is NaN rather than an error, so
  one rare task cannot stop an evaluation. A task whose rows all have weight 0 reports count 0 and NaN
  elsewhere; when nothing was added at all, only t/count (0) is reported.
  Malformed values (NaN probabilities, labels not 0/1) still raise ValueError.

  It keeps every row (AUC needs them all): about 25 bytes per row and task.
  """

  def __init__(self, tasks: Sequence[str]):
    if isinstance(tasks, str) or not tasks:
      raise ValueError(f"MetricAccumulator: tasks must be a non-empty sequence of names, got {tasks!r}")
    self.tasks = tuple(tasks)
    self.reset()

  def reset(self) -> None:
    self._labels: list[np.ndarray] = []
    self._probs: list[np.ndarray] = []
    self._weights: list[np.ndarray] = []
    self._true: list[np.ndarray] = []

  def _as_matrix(self, x, what: str, rows: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1 and len(self.tasks) == 1:
      x = x[:, None]
    if x.ndim != 2 or x.shape[1] != len(self.tasks) or (rows is not None and x.shape[0] != rows):
      want = f"[{rows if rows is not None else 'B'}, {len(self.tasks)}]"
      raise ValueError(f"MetricAccumulator.add: {what} has shape {x.shape}, want {want} (tasks {self.tasks})")
    return x

  def add(self, labels, probs, weights=None, true_probs=None) -> None:
    """Adds one batch (numpy or jax arrays; they are copied to the host)."""
    labels = self._as_matrix(labels, "labels")
    rows = labels.shape[0]
    probs = self._as_matrix(probs, "probs", rows)
    if weights is None:
      weights = np.ones((rows, len(self.tasks)), np.float32)
    else:
      weights = np.asarray(weights)
      if weights.shape == (rows,):
        weights = np.broadcast_to(weights[:, None], (rows, len(self.tasks)))
      weights = self._as_matrix(weights, "weights", rows)
    if self._labels and (true_probs is None) != (not self._true):
      raise ValueError("MetricAccumulator.add: give true_probs on every batch or on none")
    self._labels.append(np.array(labels))
    self._probs.append(np.array(probs))
    self._weights.append(np.array(weights))
    if true_probs is not None:
      self._true.append(np.array(self._as_matrix(true_probs, "true_probs", rows)))

  def result(self) -> dict[str, float]:
    """Metrics over every row added since construction or the last `reset()`."""
    out: dict[str, float] = {}
    if not self._labels:
      for t in self.tasks:
        out[f"{t}/count"] = 0.0
      return out
    labels = np.concatenate(self._labels)
    probs = np.concatenate(self._probs)
    weights = np.concatenate(self._weights)
    true = np.concatenate(self._true) if self._true else None
    for j, t in enumerate(self.tasks):
      y, p, w = labels[:, j], probs[:, j], weights[:, j]
      count = int(np.count_nonzero(w))
      out[f"{t}/count"] = float(count)
      nan = float("nan")
      if count == 0:
        out.update({f"{t}/{k}": nan for k in ("logloss", "ne", "auc", "calibration", "base_rate")})
        if true is not None:
          out[f"{t}/oracle_ne"] = nan
        continue
      out[f"{t}/logloss"] = log_loss(y, p, w)
      out[f"{t}/ne"] = _undefined_to_nan(normalized_entropy, y, p, w)
      out[f"{t}/auc"] = _undefined_to_nan(auc, y, p, w)
      out[f"{t}/calibration"] = _undefined_to_nan(calibration, y, p, w)
      w64 = w.astype(np.float64)
      out[f"{t}/base_rate"] = float(np.dot(w64, y) / w64.sum())
      if true is not None:
        out[f"{t}/oracle_ne"] = _undefined_to_nan(normalized_entropy, y, true[:, j], w)
    return out
