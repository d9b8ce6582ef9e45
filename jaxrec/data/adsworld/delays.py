"""Per-advertiser conversion-delay laws: exact CDFs and hash-keyed sampling.

Each advertiser's delay (seconds from click to conversion, given that the click converts) follows
one of three families, so that fixed-window labels and interpolation across windows (Personalized
Interpolation) face both the exponential case, where PI is exact, and heavier tails where it is not:

    EXPONENTIAL  Exp(mean m1)
    MIXTURE      fast Exp(m1) with probability p, else slow Exp(m2)
    LOGNORMAL    exp(N(mu, sigma^2))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from jaxrec.data.adsworld.hashing import substream, to_normal, to_uniform

if TYPE_CHECKING:
  from jaxrec.data.adsworld.entities import Entities

EXPONENTIAL, MIXTURE, LOGNORMAL = 0, 1, 2
FAMILY_NAMES = ("exponential", "mixture", "lognormal")


def _norm_cdf(x: np.ndarray) -> np.ndarray:
  erf = np.frompyfunc(math.erf, 1, 1)
  return 0.5 * (1.0 + erf(np.asarray(x, np.float64) / math.sqrt(2.0)).astype(np.float64))


def delay_cdf(ent: Entities, advertiser_id: np.ndarray, window_s) -> np.ndarray:
  """f64: P(delay <= window_s | the click converts), for each advertiser id (broadcast with window_s).

  Exact for every family: exponential 1 - exp(-w / m); mixture p (1 - exp(-w / m1)) +
  (1 - p)(1 - exp(-w / m2)); log-normal Phi((log w - mu) / sigma). 0 for w <= 0.
  """
  adv, w = np.broadcast_arrays(np.asarray(advertiser_id, np.int64), np.asarray(window_s, np.float64))
  fam = ent.delay_family[adv]
  m1, m2, p = ent.delay_mean1_s[adv], ent.delay_mean2_s[adv], ent.delay_weight1[adv]
  wpos = np.maximum(w, 0.0)
  fast = -np.expm1(-wpos / m1)
  out = np.where(fam == EXPONENTIAL, fast, p * fast - (1.0 - p) * np.expm1(-wpos / m2))
  logn = fam == LOGNORMAL
  if logn.any():
    lw = np.log(np.maximum(wpos[logn], 1e-300))
    out[logn] = _norm_cdf((lw - ent.delay_log_median[adv[logn]]) / ent.delay_log_sigma[adv[logn]])
  return np.where(w > 0, out, 0.0)


def sample_delay(ent: Entities, advertiser_id: np.ndarray, h: np.ndarray) -> np.ndarray:
  """f64 [n] conversion delays (seconds) drawn from each advertiser's law, keyed by hashes h [n]."""
  fam = ent.delay_family[advertiser_id]
  e1 = -np.log1p(-to_uniform(substream(h, 0)))  # Exp(1)
  pick_fast = to_uniform(substream(h, 1)) < ent.delay_weight1[advertiser_id]
  mean = np.where((fam == MIXTURE) & ~pick_fast, ent.delay_mean2_s[advertiser_id], ent.delay_mean1_s[advertiser_id])
  logn = np.exp(ent.delay_log_median[advertiser_id] + ent.delay_log_sigma[advertiser_id] * to_normal(substream(h, 2)))
  return np.where(fam == LOGNORMAL, logn, e1 * mean)
