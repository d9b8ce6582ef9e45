"""jaxrec.metrics against brute-force definitions."""

from __future__ import annotations

import doctest
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrec import metrics
from jaxrec.metrics import MetricAccumulator, UndefinedMetricError, auc, calibration, log_loss, normalized_entropy


def _auc_pairs(y, p, w) -> float:
  """O(N^2) definition: weighted share of (positive, negative) pairs ranked right, ties half."""
  num = den = 0.0
  for i in range(len(y)):
    for j in range(len(y)):
      if y[i] == 1 and y[j] == 0:
        pair = w[i] * w[j]
        den += pair
        num += pair * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
  return num / den


def _log_loss_loop(y, p, w) -> float:
  total = 0.0
  for yi, pi, wi in zip(y, p, w):
    pi = min(max(pi, 1e-7), 1 - 1e-7)
    total -= wi * (math.log(pi) if yi == 1 else math.log(1 - pi))
  return total / sum(w)


def _random(rng, n, *, levels=None, rate=0.3):
  y = (rng.random(n) < rate).astype(np.float64)
  y[0], y[1] = 0.0, 1.0  # both classes present
  p = rng.random(n)
  if levels is not None:  # few distinct scores, so many ties
    p = np.round(p * levels) / levels
  w = rng.random(n) * 2
  return y, p, w


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 60), levels=st.sampled_from([None, 1, 3, 10]))
def test_auc_matches_pair_counting(seed, n, levels):
  y, p, w = _random(np.random.default_rng(seed), n, levels=levels)
  assert auc(y, p, w) == pytest.approx(_auc_pairs(y, p, w), rel=1e-12, abs=1e-12)
  assert auc(y, p) == pytest.approx(_auc_pairs(y, p, np.ones(n)), rel=1e-12, abs=1e-12)


def test_log_loss_ne_calibration_match_definitions():
  rng = np.random.default_rng(0)
  y, p, w = _random(rng, 200)
  p[:3] = [0.0, 1.0, 1.0]  # clipped, so the loss stays finite
  y[:3] = [1.0, 0.0, 1.0]
  assert log_loss(y, p, w) == pytest.approx(_log_loss_loop(y, p, w), rel=1e-12)
  rate = np.sum(w * y) / np.sum(w)
  entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
  assert normalized_entropy(y, p, w) == pytest.approx(_log_loss_loop(y, p, w) / entropy, rel=1e-12)
  assert calibration(y, p, w) == pytest.approx(np.sum(w * p) / np.sum(w * y), rel=1e-12)
  assert log_loss(y, p) == pytest.approx(_log_loss_loop(y, p, np.ones_like(y)), rel=1e-12)


def test_integer_weights_equal_repeated_rows():
  rng = np.random.default_rng(1)
  y, p, _ = _random(rng, 300, levels=7)
  w = rng.integers(0, 4, size=y.size).astype(np.float64)
  w[:2] = 1  # keep both classes
  yr, pr = np.repeat(y, w.astype(int)), np.repeat(p, w.astype(int))
  for fn in (log_loss, normalized_entropy, auc, calibration):
    assert fn(y, p, w) == pytest.approx(fn(yr, pr), rel=1e-12), fn.__name__


def test_zero_weight_rows_are_ignored_whatever_they_hold():
  y = np.array([1.0, 0.0, 1.0, 0.0, 5.0, 1.0])
  p = np.array([0.9, 0.2, 0.6, 0.7, np.nan, -3.0])
  w = np.array([1.0, 2.0, 1.0, 1.0, 0.0, 0.0])
  for fn in (log_loss, normalized_entropy, auc, calibration):
    assert fn(y, p, w) == pytest.approx(fn(y[:4], p[:4], w[:4]), rel=1e-12), fn.__name__


def test_reference_predictors():
  rng = np.random.default_rng(2)
  y = (rng.random(1000) < 0.2).astype(np.float64)
  w = rng.random(1000)
  rate = np.sum(w * y) / np.sum(w)
  assert normalized_entropy(y, np.full_like(y, rate), w) == pytest.approx(1.0, rel=1e-12)
  assert calibration(y, np.full_like(y, rate), w) == pytest.approx(1.0, rel=1e-12)
  assert auc(y, np.full_like(y, 0.5), w) == 0.5
  perfect = np.where(y == 1, 0.9, 0.1) + rng.random(1000) * 0.05
  assert auc(y, perfect, w) == 1.0
  assert auc(y, 1 - perfect, w) == 0.0
  assert normalized_entropy(y, y) < 1e-5  # p exactly 0 or 1, clipped


def test_auc_on_a_million_rows_is_fast():
  rng = np.random.default_rng(3)
  n = 1_000_000
  score = rng.normal(size=n)
  y = (rng.random(n) < 1 / (1 + np.exp(-2 * score))).astype(np.float32)
  p = (1 / (1 + np.exp(-score))).astype(np.float32)  # float32: many ties
  start = time.perf_counter()
  value = auc(y, p, np.ones(n, np.float32))
  assert time.perf_counter() - start < 5.0
  assert 0.7 < value < 0.9


@pytest.mark.parametrize(
    "fn, y, p, w, error, match",
    [
        (normalized_entropy, [0, 0, 0], [0.1, 0.2, 0.3], None, UndefinedMetricError, "base rate is 0"),
        (normalized_entropy, [1, 1], [0.1, 0.2], None, UndefinedMetricError, "base rate is 1"),
        (normalized_entropy, [1, 0], [0.1, 0.2], [1, 0], UndefinedMetricError, "base rate is 1"),
        (auc, [1, 1], [0.1, 0.2], None, UndefinedMetricError, "no negative"),
        (auc, [0, 0], [0.1, 0.2], None, UndefinedMetricError, "no positive"),
        (calibration, [0, 0], [0.1, 0.2], None, UndefinedMetricError, "no positive labels"),
        (log_loss, [1, 0], [0.1, 0.2], [0, 0], UndefinedMetricError, "no rows with positive weight"),
        (log_loss, [], [], None, UndefinedMetricError, "no rows"),
        (log_loss, [1, 0], [0.1], None, ValueError, "labels have 2 values but probabilities have 1"),
        (log_loss, [1, 0], [0.1, 0.2], [1], ValueError, "weights have 1 values"),
        (log_loss, [1, 2], [0.1, 0.2], None, ValueError, "labels must be 0 or 1"),
        (auc, [1, 0], [0.1, np.nan], None, ValueError, r"probabilities must lie in \[0, 1\]"),
        (calibration, [1, 0], [0.1, 1.5], None, ValueError, r"probabilities must lie in \[0, 1\]"),
        (log_loss, [1, 0], [0.1, 0.2], [1, -1], ValueError, "weights must be finite and >= 0"),
    ],
)
def test_errors(fn, y, p, w, error, match):
  with pytest.raises(error, match=match):
    fn(y, p, w)
  if error is ValueError:  # malformed input is not an "undefined" metric
    with pytest.raises(ValueError) as info:
      fn(y, p, w)
    assert not isinstance(info.value, UndefinedMetricError)


def test_accumulator_equals_one_shot_on_the_concatenation():
  rng = np.random.default_rng(4)
  tasks = ("click", "conversion")
  acc = MetricAccumulator(tasks)
  parts = []
  for size in (50, 1, 128, 77):
    labels = (rng.random((size, 2)) < [0.4, 0.1]).astype(np.float32)
    true = rng.random((size, 2)).astype(np.float32)
    probs = np.clip(true + rng.normal(0, 0.1, (size, 2)), 0, 1).astype(np.float32)
    weights = np.ones(size, np.float32)
    weights[-min(size, 5):] = 0  # a padded tail
    probs[weights == 0] = np.nan  # padding may hold anything
    acc.add(labels, probs, weights, true_probs=true)
    parts.append((labels, probs, weights, true))
  labels, probs, weights, true = (np.concatenate(x) for x in zip(*parts))
  got = acc.result()
  assert set(got) == {f"{t}/{k}" for t in tasks for k in
                      ("logloss", "ne", "auc", "calibration", "count", "base_rate", "oracle_ne")}
  for j, t in enumerate(tasks):
    y, p, w = labels[:, j], probs[:, j], weights
    assert got[f"{t}/count"] == np.count_nonzero(w)
    assert got[f"{t}/logloss"] == pytest.approx(log_loss(y, p, w), rel=1e-12)
    assert got[f"{t}/ne"] == pytest.approx(normalized_entropy(y, p, w), rel=1e-12)
    assert got[f"{t}/auc"] == pytest.approx(auc(y, p, w), rel=1e-12)
    assert got[f"{t}/calibration"] == pytest.approx(calibration(y, p, w), rel=1e-12)
    assert got[f"{t}/oracle_ne"] == pytest.approx(normalized_entropy(y, true[:, j], w), rel=1e-12)
    assert got[f"{t}/base_rate"] == pytest.approx(np.sum(w * y) / np.sum(w), rel=1e-6)
  acc.reset()
  assert acc.result() == {"click/count": 0.0, "conversion/count": 0.0}


def test_accumulator_per_task_weights_single_task_and_undefined_metrics():
  acc = MetricAccumulator(("click",))
  acc.add(np.array([1.0, 0.0, 0.0]), np.array([0.7, 0.2, 0.4]))  # [B] is fine for one task
  assert acc.result()["click/auc"] == 1.0
  assert "click/oracle_ne" not in acc.result()

  acc = MetricAccumulator(("click", "conversion"))
  labels = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
  probs = np.array([[0.8, 0.1], [0.3, 0.2], [0.6, 0.9]])
  weights = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])  # the only conversion is masked out
  acc.add(labels, probs, weights)
  got = acc.result()
  assert got["click/auc"] == 1.0 and got["conversion/count"] == 2.0
  assert math.isnan(got["conversion/ne"]) and math.isnan(got["conversion/auc"])
  assert math.isnan(got["conversion/calibration"])
  assert got["conversion/logloss"] == pytest.approx(log_loss([0, 0], [0.1, 0.2]))


def test_accumulator_rejects_bad_input():
  with pytest.raises(ValueError, match="non-empty sequence"):
    MetricAccumulator("click")
  acc = MetricAccumulator(("click", "conversion"))
  with pytest.raises(ValueError, match=r"probs has shape \(3, 1\), want \[3, 2\]"):
    acc.add(np.zeros((3, 2)), np.zeros((3, 1)))
  with pytest.raises(ValueError, match="weights has shape"):
    acc.add(np.zeros((3, 2)), np.zeros((3, 2)), np.ones(4))
  acc.add(np.zeros((3, 2)), np.zeros((3, 2)), true_probs=np.zeros((3, 2)))
  with pytest.raises(ValueError, match="true_probs on every batch or on none"):
    acc.add(np.zeros((3, 2)), np.zeros((3, 2)))
  acc = MetricAccumulator(("click",))
  acc.add(np.array([1.0, 0.0]), np.array([0.5, np.nan]))
  with pytest.raises(ValueError, match="probabilities must lie"):
    acc.result()


def test_docstring_examples():
  assert doctest.testmod(metrics, extraglobs={"np": np}).failed == 0
