"""Evaluation sliced by domain: every metric overall and per `Batch.domain`.

`DomainMetrics` keeps one `jaxrec.metrics.MetricAccumulator` for all rows and one per domain;
`evaluate_by_domain` runs an eval step over a source's eval stream into it. Results are
`{"all": {...}, "0": {...}, "1": {...}, ...}`, each inner dict keyed "<task>/<metric>" as
`MetricAccumulator.result` gives it (so a domain's share is its "<task>/count").

>>> import numpy as np
>>> m = DomainMetrics(("click",), num_domains=2)
>>> m.add(np.array([[1.], [0.], [1.], [0.]]), np.array([[.9], [.2], [.6], [.7]]), np.ones(4), None,
...       np.array([0, 0, 1, 1]))
>>> r = m.result()
>>> r["all"]["click/count"], r["0"]["click/auc"], r["1"]["click/auc"]
(4.0, 1.0, 0.0)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from jaxrec.data.batch import Batch
from jaxrec.data.pipeline import BatchSource
from jaxrec.metrics import MetricAccumulator


class DomainMetrics:
  """Metrics of [B, T] eval batches, overall and per domain id in [0, num_domains)."""

  def __init__(self, tasks: Sequence[str], num_domains: int):
    if num_domains < 1:
      raise ValueError(f"DomainMetrics: num_domains must be >= 1, got {num_domains}")
    self.all = MetricAccumulator(tasks)
    self.per_domain = [MetricAccumulator(tasks) for _ in range(num_domains)]

  def add(self, labels, probs, weights, true_probs, domain) -> None:
    """labels, probs, true_probs (or None) [B, T]; weights, domain [B]."""
    labels, probs, weights, domain = (np.asarray(x) for x in (labels, probs, weights, domain))
    true_probs = None if true_probs is None else np.asarray(true_probs)
    if np.any((domain < 0) | (domain >= len(self.per_domain))):
      raise ValueError(f"DomainMetrics.add: domain ids outside [0, {len(self.per_domain)})")
    self.all.add(labels, probs, weights, true_probs)
    for d, acc in enumerate(self.per_domain):
      rows = domain == d
      if rows.any():
        acc.add(labels[rows], probs[rows], weights[rows], None if true_probs is None else true_probs[rows])

  def result(self) -> dict[str, dict[str, float]]:
    out = {"all": self.all.result()}
    for d, acc in enumerate(self.per_domain):
      out[str(d)] = acc.result()
    return out


def evaluate_by_domain(predict: Callable[[Batch], jax.Array], source: BatchSource, batch_size: int,
                       put: Callable[[Batch], Batch] = lambda b: b) -> dict[str, dict[str, float]]:
  """Runs `predict` (a device batch -> probabilities [B, T]) over the source's eval stream.

  `put` moves a host batch to the device (e.g. `jax.device_put` with the eval shardings).
  """
  acc = DomainMetrics(source.schema.labels, source.schema.num_domains)
  for b in source.eval_batches(batch_size):
    acc.add(b.labels, np.asarray(predict(put(b))), b.weights, b.true_prob, b.domain)
  return acc.result()


def flatten(result: dict[str, dict[str, float]]) -> dict[str, float]:
  """{"all": {"click/ne": x}, "3": {...}} -> {"click/ne": x, "d3/click/ne": ...}."""
  out = {}
  for part, metrics in result.items():
    prefix = "" if part == "all" else f"d{part}/"
    out.update({prefix + k: v for k, v in metrics.items()})
  return out
