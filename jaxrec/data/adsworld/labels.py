"""The label model: click logit terms, conversion logit, and per-advertiser conversion delays.

Click (for user u at time t, ad a of advertiser v and category c, domain d, context x):

    logit = additive + low_rank + cross + higher_order
    additive     = click_bias + b_d + b_u + b_a + b_v + b_placement + b_hour + b_device
                   + activity_weight * x_act(u) + price_weight * x_price(a)
    low_rank     = low_rank_scale * <z_u(t), w_a^d>                        (embeddings learn it)
    cross        = cross_scale * (C_d[segment(u), c]
                   + dense_cross_weight * (k_d1 x_act x_price + k_d2 x_hour_cos x_quality))  (DCN)
    higher_order = higher_order_scale * MLP_d(z_u(t), w_a, hour, placement, device)  (deep model)

with w^d, C_d, k_d and the MLP's output layer mixed per domain as a_d * shared + b_d * private
(`AdsWorldConfig.domain_agreement`, `conflict_domain`). Conversion given click:

    cvr_logit = cvr_bias + b'_d + b'_u + b'_a + b'_v + cvr_low_rank_scale * <z_u(t), v_a>
                + cvr_price_weight * x_price(a)

and the conversion happens `delay` seconds after the click, delay ~ the advertiser's law
(`jaxrec.data.adsworld.delays`).
"""

from __future__ import annotations

import numpy as np

from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.entities import Entities


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def user_latent(cfg: AdsWorldConfig, ent: Entities, user_id: np.ndarray, timestamp_s: np.ndarray) -> np.ndarray:
  """f32 [N, k] preference z_u(t): linear interpolation of the user's drift knots."""
  x = np.asarray(timestamp_s, np.float64) / cfg.drift_knot_s
  n0 = np.clip(np.floor(x).astype(np.int64), 0, ent.user_knots.shape[1] - 2)
  f = np.clip(x - n0, 0.0, 1.0).astype(np.float32)[:, None]
  user_id = np.asarray(user_id, np.int64)
  return (1.0 - f) * ent.user_knots[user_id, n0] + f * ent.user_knots[user_id, n0 + 1]


def matmul_rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """x [N, k] @ w [k, M], summed over k in a fixed order: each row's result does not depend on N.

  BLAS blocks a matmul by its row count, so `x @ w` can change a row's last bit with the batch size
  (it did for the higher-order term), and an example must be the same whichever batch holds it.
  """
  out = np.zeros((x.shape[0], w.shape[1]), np.result_type(x, w))
  for j in range(x.shape[1]):
    out += x[:, j, None] * w[j]
  return out


def hour_angle(timestamp_s: np.ndarray) -> np.ndarray:
  return (2.0 * np.pi / 86400.0) * np.mod(timestamp_s, 86400.0)


def click_terms(cfg: AdsWorldConfig, ent: Entities, req: dict[str, np.ndarray], z: np.ndarray,
                ex_req: np.ndarray, ad: np.ndarray) -> dict[str, np.ndarray]:
  """The four click-logit terms, f32 [E] each.

  req: per-request arrays (length R') user_id, domain, device, placement, hour, hour_sin, hour_cos;
  z: f32 [R', k] user preferences at the request times; ex_req: i64 [E] the request of each example;
  ad: i64 [E] its ad.
  """
  u = req["user_id"][ex_req]
  d = req["domain"][ex_req]
  adv = ent.ad_advertiser[ad]
  x_act, x_price = ent.user_activity_x[u], ent.ad_price_x[ad]
  additive = (cfg.click_bias + ent.domain_bias[d] + ent.user_bias[u] + ent.ad_bias[ad] + ent.advertiser_bias[adv]
              + ent.placement_bias[req["placement"]][ex_req] + ent.hour_bias[req["hour"]][ex_req]
              + ent.device_bias[req["device"]][ex_req] + cfg.activity_weight * x_act + cfg.price_weight * x_price)
  low_rank = cfg.low_rank_scale * np.einsum("ek,ek->e", z[ex_req], ent.ad_latent_dom[d, ad])
  dense = (ent.dense_cross[d, 0] * x_act * x_price
           + ent.dense_cross[d, 1] * req["hour_cos"][ex_req] * ent.ad_quality_x[ad])
  cross = cfg.cross_scale * (ent.cross_table[d, ent.user_segment[u], ent.ad_category[ad]]
                             + cfg.dense_cross_weight * dense)
  hour = np.stack([req["hour_sin"], req["hour_cos"]], 1).astype(np.float32)
  pre_req = (matmul_rows(z, ent.mlp_user) + matmul_rows(hour, ent.mlp_hour)
             + ent.mlp_placement[req["placement"]] + ent.mlp_device[req["device"]] + ent.mlp_bias)
  hidden = np.tanh(pre_req[ex_req] + ent.ad_hidden[ad])
  out = np.take_along_axis(matmul_rows(hidden, ent.mlp_out), d[:, None].astype(np.int64), axis=1)[:, 0]
  higher = cfg.higher_order_scale * (out - ent.mlp_mean[d]) / ent.mlp_std[d]
  f32 = np.float32
  return {"additive": additive.astype(f32), "low_rank": low_rank.astype(f32), "cross": cross.astype(f32),
          "higher_order": higher.astype(f32)}


def cvr_logit(cfg: AdsWorldConfig, ent: Entities, req: dict[str, np.ndarray], z: np.ndarray,
              ex_req: np.ndarray, ad: np.ndarray) -> np.ndarray:
  """f32 [E] logit of p(convert eventually | click)."""
  u = req["user_id"][ex_req]
  d = req["domain"][ex_req]
  logit = (cfg.cvr_bias + ent.domain_cvr_bias[d] + ent.user_cvr_bias[u] + ent.ad_cvr_bias[ad]
           + ent.advertiser_cvr_bias[ent.ad_advertiser[ad]] + cfg.cvr_price_weight * ent.ad_price_x[ad]
           + cfg.cvr_low_rank_scale * np.einsum("ek,ek->e", z[ex_req], ent.ad_cvr_latent[ad]))
  return logit.astype(np.float32)
