"""The synthetic ads world: a seeded, deterministic generator of ads-ranking data with known truth.

Users with drifting latent preferences and churn, ads of advertisers with per-advertiser conversion
delays, bursty per-user request streams (ERCache's 52% / 76% gaps), candidate lists that repeat
across a user's nearby requests, several domains with controlled agreement and one conflicting
domain, and click / conversion labels drawn from known functions with planted interactions (low-rank,
explicit crosses, a higher-order term). Generated on the fly in numpy; nothing is read from disk.

>>> world = AdsWorld(AdsWorldConfig.small())
>>> batch = world.batch("train", 0, 64)
>>> batch.sparse.shape, batch.labels.shape, world.schema.labels
((64, 9, 1), (64, 2), ('click', 'conversion'))

Public API:
  AdsWorldConfig                      every knob, documented, with calibrated defaults
  AdsWorld(cfg)
    .schema                           Schema (8 sparse one-hot features, dense features, 2 labels)
    .batch(split, index, batch_size)  Batch with true_prob (the Bayes-optimal probabilities)
    .batch_extras(...)                dict of per-example truth (ids, click, conversion delay, ...)
    .batch_with_extras(...)           both
    .examples(split, start, stop)     the same for any example range
    .request_stream(num_users, duration_s, seed) -> Requests
    .requests(split, start_s, end_s), .request_slice(split, start, stop) -> Requests
    .candidates(user_id, timestamp_s) -> [R, K] ads
    .user_latent(user_id, timestamp_s), .delay_cdf(advertiser_id, window_s), .delay_family(...)
  Requests                            a time-ordered request table
"""

from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.delays import EXPONENTIAL, FAMILY_NAMES, LOGNORMAL, MIXTURE
from jaxrec.data.adsworld.requests import Requests
from jaxrec.data.adsworld.sample import make_schema
from jaxrec.data.adsworld.world import AdsWorld

__all__ = ["EXPONENTIAL", "FAMILY_NAMES", "LOGNORMAL", "MIXTURE", "AdsWorld", "AdsWorldConfig", "Requests",
           "make_schema"]
