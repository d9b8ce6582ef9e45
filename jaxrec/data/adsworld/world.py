"""`AdsWorld`: the seeded synthetic ads world and its example streams."""

from __future__ import annotations

import threading

import numpy as np

from jaxrec.data.adsworld import delays, labels
from jaxrec.data.adsworld.candidates import candidate_ads
from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.entities import TAG_STREAM, Entities, build_entities
from jaxrec.data.adsworld.hashing import hash64, stable_id
from jaxrec.data.adsworld.requests import RequestLog, Requests, simulate_requests
from jaxrec.data.adsworld.sample import make_examples, make_schema
from jaxrec.data.batch import Batch, Schema


class AdsWorld:
  """A deterministic synthetic ads world with known label probabilities.

  Each split (any string: "train", "eval", ...) is its own random request log over the same world
  (same users, ads, label functions and times), so splits are disjoint draws of the same process.
  A split's example stream is its requests in time order, each expanded into K candidate examples;
  `batch(split, i, B)` is examples [i B, (i + 1) B) of that stream, so batches advance in world time
  (streaming training reads indices in order; a time-split evaluation reads later indices). Streams
  end at the horizon (`num_examples`); reading past it raises IndexError.

  Truth: `Batch.true_prob[:, 0]` is the exact probability with which the click label was drawn, and
  `true_prob[:, 1]` = p_click * p_cvr * P(delay <= attribution_window_s) the exact probability of the
  conversion label. Every input of the label functions (user and ad ids, timestamp, domain,
  placement, device) is in the features, so `true_prob` is also the Bayes-optimal prediction from
  the features: its NE is the oracle NE, the floor for any model.

  The world caches request-log pages behind locks, so threads may share it.
  """

  def __init__(self, cfg: AdsWorldConfig):
    self.cfg = cfg
    self.entities: Entities = build_entities(cfg)
    self.schema: Schema = make_schema(cfg)
    self._logs: dict[str, RequestLog] = {}
    self._logs_lock = threading.Lock()

  def _log(self, split: str) -> RequestLog:
    with self._logs_lock:
      if split not in self._logs:
        self._logs[split] = RequestLog(self.cfg, self.entities, stable_id(split))
      return self._logs[split]

  # ----- examples -------------------------------------------------------------------------------

  def examples(self, split: str, start: int, stop: int) -> tuple[Batch, dict[str, np.ndarray]]:
    """Examples [start, stop) of the split's stream, with their extras (see `batch_extras`)."""
    if not 0 <= start <= stop:
      raise IndexError(f"bad example range [{start}, {stop})")
    K = self.cfg.candidates_per_request
    requests = self._log(split).slice(start // K, (stop - 1) // K + 1 if stop > start else start // K)
    return make_examples(self.cfg, self.entities, stable_id(split), requests, start, stop)

  def batch_with_extras(self, split: str, index: int, batch_size: int) -> tuple[Batch, dict[str, np.ndarray]]:
    if batch_size <= 0 or index < 0:
      raise ValueError(f"need index >= 0 and batch_size > 0, got index={index}, batch_size={batch_size}")
    return self.examples(split, index * batch_size, (index + 1) * batch_size)

  def batch(self, split: str, index: int, batch_size: int) -> Batch:
    """Batch `index` of `batch_size` examples of the split (host numpy arrays, see `Batch`).

    Deterministic in (cfg, split, index, batch_size); an example's content does not even depend on
    the batching. labels = (click, conversion); true_prob = their exact probabilities.
    """
    return self.batch_with_extras(split, index, batch_size)[0]

  def batch_extras(self, split: str, index: int, batch_size: int) -> dict[str, np.ndarray]:
    """Per-example ground truth of `batch(split, index, batch_size)`, arrays of length B:

    example_id i64, request_id i64, slot i64 (candidate position), timestamp_s f64, user_id, ad_id,
    advertiser_id, domain (i64), click bool, conversion_delay_s f64 (seconds from click to
    conversion; inf when the example does not convert, always inf without a click), p_click f32,
    p_cvr f32 (P(convert eventually | click)), and the click-logit terms logit_additive,
    logit_low_rank, logit_cross, logit_higher_order f32 (their sum is logit(p_click)).

    The conversion label for any window W is click & (conversion_delay_s <= W), with probability
    p_click * p_cvr * delay_cdf(advertiser_id, W).
    """
    return self.batch_with_extras(split, index, batch_size)[1]

  def num_examples(self, split: str) -> int:
    """Examples in the split's stream over the horizon (generates the whole request log once)."""
    return self._log(split).num_requests() * self.cfg.candidates_per_request

  # ----- requests -------------------------------------------------------------------------------

  def requests(self, split: str, start_s: float, end_s: float) -> Requests:
    """The split's requests with start_s <= timestamp_s < end_s, in time order."""
    return self._log(split).between(start_s, end_s)

  def request_slice(self, split: str, start: int, stop: int) -> Requests:
    """Requests [start, stop) of the split's log (request ids start .. stop - 1)."""
    return self._log(split).slice(start, stop)

  def request_stream(self, num_users: int, duration_s: float, seed: int) -> Requests:
    """A fresh request stream of world users [0, num_users) over [0, duration_s), time-ordered.

    For cache simulations (ERCache, SOAP): the same session process as the split logs, with the
    users' activity levels, but every user active for the whole duration (no churn) and a stream
    seeded by (cfg.seed, seed). Gaps between a user's consecutive requests: about 52% under 60 s
    and 76% under 600 s with the default config. Candidate lists: `candidates(user_id, timestamp_s)`.
    """
    if not 0 < num_users <= self.cfg.num_users:
      raise ValueError(f"num_users must be in [1, {self.cfg.num_users}], got {num_users}")
    rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, TAG_STREAM, seed]))
    return simulate_requests(self.cfg, self.entities, num_users, duration_s, rng)

  def candidates(self, user_id: np.ndarray, timestamp_s: np.ndarray) -> np.ndarray:
    """i32 [R, K] candidate ads for requests of users `user_id` [R] at times `timestamp_s` [R].

    A pure function of (user, time): the same for every split and stream, and a user's lists at
    nearby times overlap (slot j keeps its ad for a period between candidate_refresh_min_s and
    candidate_refresh_max_s).
    """
    return candidate_ads(self.cfg, self.entities, user_id, timestamp_s)

  # ----- ground truth -----------------------------------------------------------------------

  def user_latent(self, user_id: np.ndarray, timestamp_s: np.ndarray) -> np.ndarray:
    """f32 [N, k]: users' preference vectors z_u(t) (they drift; see drift_timescale_days)."""
    return labels.user_latent(self.cfg, self.entities, user_id, np.asarray(timestamp_s, np.float64))

  def delay_cdf(self, advertiser_id: np.ndarray, window_s) -> np.ndarray:
    """f64: P(conversion delay <= window_s | the click converts) per advertiser (broadcast)."""
    return delays.delay_cdf(self.entities, advertiser_id, window_s)

  def delay_family(self, advertiser_id: np.ndarray) -> np.ndarray:
    """i32: the advertisers' delay families (0 exponential, 1 fast/slow mixture, 2 log-normal)."""
    return self.entities.delay_family[np.asarray(advertiser_id, np.int64)]

  def sample_delays(self, advertiser_id: np.ndarray, seed: int) -> np.ndarray:
    """f64 [n]: fresh conversion delays of `advertiser_id` [n] (for checking delay models)."""
    adv = np.asarray(advertiser_id, np.int64)
    return delays.sample_delay(self.entities, adv, hash64(self.cfg.seed, TAG_STREAM, seed, np.arange(adv.size)))
