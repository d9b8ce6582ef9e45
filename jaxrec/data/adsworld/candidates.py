"""Candidate lists: K ads per request that persist across a user's nearby requests.

Slot j of user u holds one ad for a period T_j (log-spaced between `candidate_refresh_min_s` and
`candidate_refresh_max_s`) with a per-(user, slot) phase: the slot's ad is a hash-seeded draw keyed
by (user, slot, floor((t + phase) / T_j)). Two requests `g` seconds apart therefore share slot j with
probability max(0, 1 - g / T_j): nearly all candidates within a burst, fewer over hours. The draw is
from the user's segment-targeted law (share `candidate_targeting`) or the global popularity law,
restricted to ads active at t and without repeats inside a list; it is redrawn (next attempt key)
until it is valid, falling back to an evergreen ad.
"""

from __future__ import annotations

import numpy as np

from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.entities import TAG_CANDIDATES, Entities
from jaxrec.data.adsworld.hashing import hash64, substream, to_uniform

_MAX_ATTEMPTS = 32  # about half the ads are active at a time: 0.5^32 misses


def _duplicates(ads: np.ndarray) -> np.ndarray:
  """bool [R, K]: True where the ad (>= 0) already appears at a lower slot of its row."""
  order = np.argsort(ads, axis=1, kind="stable")
  srt = np.take_along_axis(ads, order, axis=1)
  dup_sorted = np.zeros_like(ads, dtype=bool)
  dup_sorted[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
  dup = np.zeros_like(dup_sorted)
  np.put_along_axis(dup, order, dup_sorted, axis=1)
  return dup


def _fill(ads: np.ndarray, rows: np.ndarray, cols: np.ndarray, cand: np.ndarray) -> None:
  """Writes cand (-1 = none) into the empty cells (rows, cols) of `ads` [R, K], in place, skipping ads
  already in the row; of new equal ads in a row only the lowest slot keeps it."""
  present = (ads[rows] == cand[:, None]).any(axis=1)
  ads[rows, cols] = np.where(present, -1, cand)
  dup = _duplicates(ads)  # only new-vs-new repeats remain
  ads[dup] = -1


def candidate_ads(cfg: AdsWorldConfig, ent: Entities, user_id: np.ndarray, timestamp_s: np.ndarray) -> np.ndarray:
  """i32 [R, K] candidate ads of the requests (user_id [R], timestamp_s [R]); a pure function."""
  user_id = np.asarray(user_id, np.int64)
  t = np.asarray(timestamp_s, np.float64)
  R, K, A = user_id.size, cfg.candidates_per_request, cfg.num_ads
  slots = np.arange(K)
  period = ent.slot_period_s[None, :]
  phase = to_uniform(hash64(cfg.seed, TAG_CANDIDATES, 0, user_id[:, None], slots[None, :])) * period
  bucket = np.floor((t[:, None] + phase) / period).astype(np.int64)
  segment = ent.user_segment[user_id]
  ads = np.full((R, K), -1, np.int64)
  rows, cols = np.nonzero(ads < 0)
  for attempt in range(_MAX_ATTEMPTS):
    h = hash64(cfg.seed, TAG_CANDIDATES, 1, user_id[rows], cols, bucket[rows, cols], attempt)
    pick, src = to_uniform(substream(h, 0)), to_uniform(substream(h, 1))
    seg = segment[rows]
    targeted = np.searchsorted(ent.segment_cdf_flat, seg + pick, side="right") - seg * A
    popular = np.searchsorted(ent.global_cdf, pick, side="right")
    cand = np.clip(np.where(src < cfg.candidate_targeting, targeted, popular), 0, A - 1)
    tr = t[rows]
    ok = (ent.ad_start_s[cand] <= tr) & (tr < ent.ad_end_s[cand])
    _fill(ads, rows, cols, np.where(ok, cand, -1))
    rows, cols = np.nonzero(ads < 0)
    if rows.size == 0:
      break
  else:  # practically never: walk the evergreen ads from a hashed start until the list has no repeat
    for step in range(ent.num_evergreen_ads):
      first = hash64(cfg.seed, TAG_CANDIDATES, 2, user_id[rows], cols, bucket[rows, cols])
      _fill(ads, rows, cols, ((first % np.uint64(ent.num_evergreen_ads)).astype(np.int64) + step)
            % ent.num_evergreen_ads)
      rows, cols = np.nonzero(ads < 0)
      if rows.size == 0:
        break
  return ads.astype(np.int32)
