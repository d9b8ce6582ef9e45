"""Examples from requests: features, true probabilities and labels of (request, candidate) pairs.

Example e of a split's stream is candidate slot e % K of request e // K (requests in time order,
K = `candidates_per_request`). Its random draws (labels, delay, noise features) are hashes of
(seed, split, request id, slot), so an example is the same whichever batch or batch size holds it.
"""

from __future__ import annotations

import numpy as np

from jaxrec.data.adsworld.candidates import candidate_ads
from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.entities import TAG_EXAMPLES, Entities
from jaxrec.data.adsworld.hashing import hash64, substream, to_normal, to_uniform
from jaxrec.data.adsworld.delays import sample_delay
from jaxrec.data.adsworld.labels import click_terms, cvr_logit, hour_angle, sigmoid, user_latent
from jaxrec.data.adsworld.requests import Requests
from jaxrec.data.batch import Batch, Schema, SparseFeature, batch_from_numpy

LABELS = ("click", "conversion")
SPARSE = ("user_id", "ad_id", "advertiser_id", "ad_category", "user_segment", "placement", "hour", "device",
          "domain")
DENSE = ("user_activity", "ad_quality", "ad_price", "hour_sin", "hour_cos")


def make_schema(cfg: AdsWorldConfig) -> Schema:
  vocab = {
      "user_id": cfg.num_users, "ad_id": cfg.num_ads, "advertiser_id": cfg.num_advertisers,
      "ad_category": cfg.num_ad_categories, "user_segment": cfg.num_user_segments,
      "placement": cfg.num_placements, "hour": 24, "device": cfg.num_devices, "domain": cfg.num_domains,
  }
  return Schema(
      dense=DENSE + tuple(f"noise_{i}" for i in range(cfg.num_noise_features)),
      sparse=tuple(SparseFeature(name, vocab[name], 1) for name in SPARSE),
      labels=LABELS,
      num_domains=cfg.num_domains,
  )


def make_examples(cfg: AdsWorldConfig, ent: Entities, split_key: int, requests: Requests,
                  start: int, stop: int) -> tuple[Batch, dict[str, np.ndarray]]:
  """Examples [start, stop) of the stream; `requests` must be requests start // K .. (stop - 1) // K."""
  K = cfg.candidates_per_request
  e = np.arange(start, stop, dtype=np.int64)
  ex_req = e // K - start // K  # index into `requests`
  slot = e % K
  t = requests.timestamp_s
  angle = hour_angle(t)
  req = {
      "user_id": requests.user_id.astype(np.int64), "domain": requests.domain.astype(np.int64),
      "device": requests.device.astype(np.int64), "placement": requests.placement.astype(np.int64),
      "hour": (np.mod(t, 86400.0) // 3600.0).astype(np.int64),
      "hour_sin": np.sin(angle).astype(np.float32), "hour_cos": np.cos(angle).astype(np.float32),
  }
  z = user_latent(cfg, ent, requests.user_id, t)
  ad = candidate_ads(cfg, ent, requests.user_id, t)[ex_req, slot].astype(np.int64)
  u = req["user_id"][ex_req]
  adv = ent.ad_advertiser[ad]

  terms = click_terms(cfg, ent, req, z, ex_req, ad)
  click_logit = terms["additive"] + terms["low_rank"] + terms["cross"] + terms["higher_order"]
  p_click = sigmoid(click_logit).astype(np.float32)
  p_cvr = sigmoid(cvr_logit(cfg, ent, req, z, ex_req, ad)).astype(np.float32)
  p_conv = (p_click * p_cvr * ent.delay_cdf_window[adv]).astype(np.float32)

  h = hash64(cfg.seed, TAG_EXAMPLES, split_key, requests.request_id[ex_req], slot)
  click = to_uniform(substream(h, 0)) < p_click
  converts = click & (to_uniform(substream(h, 1)) < p_cvr)
  delay = np.full(e.size, np.inf)
  idx = np.nonzero(converts)[0]
  delay[idx] = sample_delay(ent, adv[idx], substream(h[idx], 2))
  conversion = delay <= cfg.attribution_window_s

  n = e.size
  dense = np.empty((n, len(DENSE) + cfg.num_noise_features), np.float32)
  dense[:, 0] = ent.user_activity_x[u]
  dense[:, 1] = ent.ad_quality_x[ad]
  dense[:, 2] = ent.ad_price_x[ad]
  dense[:, 3] = req["hour_sin"][ex_req]
  dense[:, 4] = req["hour_cos"][ex_req]
  for i in range(cfg.num_noise_features):
    dense[:, len(DENSE) + i] = to_normal(substream(h, 10 + i))
  sparse = np.stack([u, ad, adv, ent.ad_category[ad], ent.user_segment[u], req["placement"][ex_req],
                     req["hour"][ex_req], req["device"][ex_req], req["domain"][ex_req]], axis=1)[:, :, None]

  batch = batch_from_numpy(
      dense=dense,
      sparse=sparse,
      sparse_mask=np.ones(sparse.shape, bool),
      labels=np.stack([click, conversion], axis=1),
      weights=np.ones(n, np.float32),
      domain=req["domain"][ex_req],
      timestamp=np.floor(t[ex_req]),
      true_prob=np.stack([p_click, p_conv], axis=1),
  )
  extras = {
      "example_id": e,
      "request_id": requests.request_id[ex_req],
      "slot": slot,
      "timestamp_s": t[ex_req],
      "user_id": u,
      "ad_id": ad,
      "advertiser_id": adv,
      "domain": req["domain"][ex_req],
      "click": click,
      "conversion_delay_s": delay,
      "p_click": p_click,
      "p_cvr": p_cvr,
      "logit_additive": terms["additive"],
      "logit_low_rank": terms["low_rank"],
      "logit_cross": terms["cross"],
      "logit_higher_order": terms["higher_order"],
  }
  return batch, extras
