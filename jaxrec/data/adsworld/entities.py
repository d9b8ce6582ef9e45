"""The static part of the world: users, ads, advertisers, contexts and the label-function parameters.

Everything here is drawn once from `cfg.seed` (numpy Generator over a SeedSequence) and never changes;
time enters only through the users' preference knots (drift) and the active ranges (churn).
Notation: U users, A ads, V advertisers, C categories, S segments, D domains, P placements, k latent
dimension, H hidden width of the higher-order MLP, N drift knots.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data.adsworld.config import AdsWorldConfig
from jaxrec.data.adsworld.delays import EXPONENTIAL, delay_cdf

# Tags that keep the seed streams of different purposes apart.
TAG_ENTITIES, TAG_SESSIONS, TAG_STREAM, TAG_CANDIDATES, TAG_EXAMPLES = 11, 12, 13, 14, 15



@dataclasses.dataclass(frozen=True, eq=False)
class Entities:
  """Arrays of the static world (see the module docstring for the letters)."""

  # users
  user_segment: np.ndarray  # i32 [U]
  user_device: np.ndarray  # i32 [U] primary device
  user_activity: np.ndarray  # f64 [U] session-rate multiplier, mean 1
  user_activity_x: np.ndarray  # f32 [U] dense feature: standardised log activity
  user_bias: np.ndarray  # f32 [U] click
  user_cvr_bias: np.ndarray  # f32 [U]
  user_start_s: np.ndarray  # f64 [U] active range [start, end)
  user_end_s: np.ndarray  # f64 [U]
  user_knots: np.ndarray  # f32 [U, N, k] preference z_u at t = n * drift_knot_s
  # ads
  ad_advertiser: np.ndarray  # i32 [A]
  ad_category: np.ndarray  # i32 [A]
  ad_bias: np.ndarray  # f32 [A]
  ad_cvr_bias: np.ndarray  # f32 [A]
  ad_quality_x: np.ndarray  # f32 [A] dense feature: noisy standardised view of ad_bias
  ad_price_x: np.ndarray  # f32 [A] dense feature: standardised log price
  ad_start_s: np.ndarray  # f64 [A]
  ad_end_s: np.ndarray  # f64 [A]
  ad_latent: np.ndarray  # f32 [A, k] shared latent w_a
  ad_latent_dom: np.ndarray  # f32 [D, A, k] per-domain effective latent a_d w_a + b_d w_a^(d)
  ad_cvr_latent: np.ndarray  # f32 [A, k] v_a
  ad_hidden: np.ndarray  # f32 [A, H] the ad's contribution to the MLP pre-activation
  num_evergreen_ads: int  # ads [0, E) never churn
  # advertisers
  advertiser_bias: np.ndarray  # f32 [V]
  advertiser_cvr_bias: np.ndarray  # f32 [V]
  advertiser_category: np.ndarray  # i32 [V] main category
  delay_family: np.ndarray  # i32 [V] EXPONENTIAL | MIXTURE | LOGNORMAL
  delay_mean1_s: np.ndarray  # f64 [V] exponential mean, or the fast mean of a mixture
  delay_mean2_s: np.ndarray  # f64 [V] slow mean of a mixture
  delay_weight1: np.ndarray  # f64 [V] weight of the fast component of a mixture
  delay_log_median: np.ndarray  # f64 [V] log-normal: log of the median (seconds)
  delay_log_sigma: np.ndarray  # f64 [V] log-normal sigma
  delay_cdf_window: np.ndarray  # f64 [V] P(delay <= cfg.attribution_window_s)
  # domains and context
  domain_mix: np.ndarray  # f64 [D, 2] (a_d, b_d): shared and private weights of interactions
  domain_cdf: np.ndarray  # f64 [D] cumulative traffic shares
  domain_bias: np.ndarray  # f32 [D]
  domain_cvr_bias: np.ndarray  # f32 [D]
  placement_cdf: np.ndarray  # f64 [D, P] cumulative placement shares per domain
  placement_bias: np.ndarray  # f32 [P]
  hour_bias: np.ndarray  # f32 [24]
  device_bias: np.ndarray  # f32 [devices]
  # crosses
  cross_table: np.ndarray  # f32 [D, S, C] effective C_d[segment, category]
  dense_cross: np.ndarray  # f32 [D, 2] weights of activity*price and hour_cos*quality
  # higher-order MLP: h = tanh(pre_user(z) + pre_ctx + ad_hidden[a]); out_d = (h . v_d - mean_d) / std_d
  mlp_user: np.ndarray  # f32 [k, H]
  mlp_hour: np.ndarray  # f32 [2, H] (hour sin, hour cos)
  mlp_placement: np.ndarray  # f32 [P, H]
  mlp_device: np.ndarray  # f32 [devices, H]
  mlp_bias: np.ndarray  # f32 [H]
  mlp_out: np.ndarray  # f32 [H, D]
  mlp_mean: np.ndarray  # f32 [D]
  mlp_std: np.ndarray  # f32 [D]
  # candidate sampler
  segment_cdf_flat: np.ndarray  # f64 [S * A] segment s's CDF over ads, shifted by +s, concatenated
  global_cdf: np.ndarray  # f64 [A]
  slot_period_s: np.ndarray  # f64 [K] how long candidate slot j keeps its ad


def _loguniform(rng: np.random.Generator, lo_hi: tuple[float, float], n: int) -> np.ndarray:
  lo, hi = lo_hi
  return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _standardise(x: np.ndarray) -> np.ndarray:
  return ((x - x.mean()) / max(float(x.std()), 1e-12)).astype(np.float32)


def _f32(x) -> np.ndarray:
  return np.asarray(x, np.float32)


def _centred(rng: np.random.Generator, std: float, n: int, weights: np.ndarray | None = None) -> np.ndarray:
  """N(0, std^2) draws shifted to (weighted) mean 0, so that the click rate varies little across seeds."""
  x = rng.normal(0.0, std, n)
  return x - np.average(x, weights=weights)


def _active_ranges(rng: np.random.Generator, n: int, churn_per_day: float, horizon_s: float,
                   num_evergreen: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Start/end times with a stationary expected active count: a share 1 / (1 + r H) starts at 0,
  the rest arrive uniformly over the horizon; lifetimes are exponential with rate r."""
  r = churn_per_day / 86400.0
  if r <= 0:
    return np.zeros(n), np.full(n, np.inf)
  initial = rng.random(n) < 1.0 / (1.0 + r * horizon_s)
  start = np.where(initial, 0.0, rng.uniform(0.0, horizon_s, n))
  end = start + rng.exponential(1.0 / r, n)
  start[:num_evergreen], end[:num_evergreen] = 0.0, np.inf
  return start, end


def _domain_mix(cfg: AdsWorldConfig) -> np.ndarray:
  a = np.full(cfg.num_domains, cfg.domain_agreement)
  if cfg.conflict_domain >= 0:
    a[cfg.conflict_domain] = -cfg.conflict_strength
  return np.stack([a, np.sqrt(1.0 - a**2)], axis=1)


def _mix_domains(mix: np.ndarray, shared: np.ndarray, private: np.ndarray) -> np.ndarray:
  """a_d * shared + b_d * private[d], for private of shape [D, *shared.shape]."""
  expand = (slice(None),) + (None,) * shared.ndim
  return (mix[:, 0][expand] * shared[None] + mix[:, 1][expand] * private).astype(np.float32)


def _ou_knots(rng: np.random.Generator, cfg: AdsWorldConfig, num: int, scale: float) -> np.ndarray:
  """[num, N, k] Ornstein-Uhlenbeck paths with stationary std `scale` sampled at the knots."""
  n_knots = int(np.ceil(cfg.horizon_s / cfg.drift_knot_s)) + 2
  rho = float(np.exp(-cfg.drift_knot_s / (cfg.drift_timescale_days * 86400.0)))
  knots = np.empty((num, n_knots, cfg.latent_dim), np.float32)
  z = rng.normal(0.0, scale, (num, cfg.latent_dim))
  step = scale * np.sqrt(1.0 - rho**2)
  for n in range(n_knots):
    knots[:, n] = z
    z = rho * z + rng.normal(0.0, step, z.shape)
  return knots


def build_entities(cfg: AdsWorldConfig) -> Entities:
  rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, TAG_ENTITIES]))
  U, A, V, C, S = cfg.num_users, cfg.num_ads, cfg.num_advertisers, cfg.num_ad_categories, cfg.num_user_segments
  D, P, k, H, K = cfg.num_domains, cfg.num_placements, cfg.latent_dim, cfg.higher_order_hidden, cfg.candidates_per_request
  mix = _domain_mix(cfg)
  lat_std = k**-0.25  # so that <z, w> has unit variance

  # users
  user_segment = rng.integers(0, S, U).astype(np.int32)
  user_device = rng.integers(0, cfg.num_devices, U).astype(np.int32)
  log_act = rng.normal(0.0, cfg.activity_sigma, U)
  user_activity = np.exp(log_act - 0.5 * cfg.activity_sigma**2)
  user_bias = _centred(rng, cfg.user_bias_std, U)
  s = cfg.cvr_user_bias_share
  user_cvr_bias = cfg.cvr_user_bias_std * (s * user_bias / max(cfg.user_bias_std, 1e-12)
                                           + np.sqrt(1 - s**2) * rng.normal(0.0, 1.0, U))
  user_start, user_end = _active_ranges(rng, U, cfg.user_churn_per_day, cfg.horizon_s)
  user_knots = _ou_knots(rng, cfg, U, lat_std)

  # advertisers and ads
  advertiser_category = rng.integers(0, C, V).astype(np.int32)
  size_w = (np.arange(V) + 1.0) ** -0.7
  ad_advertiser = np.concatenate([rng.permutation(V)[: min(V, A)],
                                  rng.choice(V, max(A - V, 0), p=size_w / size_w.sum())]).astype(np.int32)
  ad_category = np.where(rng.random(A) < 0.8, advertiser_category[ad_advertiser],
                         rng.integers(0, C, A)).astype(np.int32)
  ad_bias = _centred(rng, cfg.ad_bias_std, A)
  ad_quality_x = _standardise(0.8 * ad_bias / max(cfg.ad_bias_std, 1e-12) + 0.6 * rng.normal(0.0, 1.0, A))
  ad_price_x = _standardise(rng.normal(0.0, 1.0, A))
  ad_cvr_bias = _centred(rng, cfg.cvr_ad_bias_std, A)
  num_evergreen = max(1, int(round(cfg.evergreen_ad_fraction * A)))
  ad_start, ad_end = _active_ranges(rng, A, cfg.ad_churn_per_day, cfg.horizon_s, num_evergreen)
  ad_latent = rng.normal(0.0, lat_std, (A, k))
  ad_latent_dom = _mix_domains(mix, ad_latent, rng.normal(0.0, lat_std, (D, A, k)))
  c = cfg.cvr_latent_share
  ad_cvr_latent = c * ad_latent + np.sqrt(1 - c**2) * rng.normal(0.0, lat_std, (A, k))

  advertiser_bias = _centred(rng, cfg.advertiser_bias_std, V)
  advertiser_cvr_bias = _centred(rng, cfg.cvr_advertiser_bias_std, V)
  fw = np.asarray(cfg.delay_family_weights, np.float64)
  delay_family = rng.choice(3, V, p=fw / fw.sum()).astype(np.int32)
  exp_mean = _loguniform(rng, cfg.delay_exp_mean_s, V)
  fast_mean = _loguniform(rng, cfg.delay_fast_mean_s, V)
  delay_mean1 = np.where(delay_family == EXPONENTIAL, exp_mean, fast_mean)
  delay_mean2 = _loguniform(rng, cfg.delay_slow_mean_s, V)
  delay_weight1 = rng.uniform(*cfg.delay_fast_weight, V)
  delay_log_median = np.log(_loguniform(rng, cfg.delay_lognormal_median_s, V))
  delay_log_sigma = rng.uniform(*cfg.delay_lognormal_sigma, V)

  # domains and context
  traffic = np.asarray(cfg.domain_traffic, np.float64)
  domain_cdf = np.cumsum(traffic / traffic.sum())
  domain_bias = _centred(rng, cfg.domain_bias_std, D, traffic)
  domain_cvr_bias = _centred(rng, cfg.cvr_domain_bias_std, D, traffic)
  placement_w = rng.dirichlet(np.ones(P), D)
  placement_cdf = np.cumsum(placement_w, axis=1)
  placement_bias = _centred(rng, cfg.context_bias_std, P)
  hour_bias = _centred(rng, cfg.context_bias_std, 24)
  device_bias = _centred(rng, cfg.context_bias_std, cfg.num_devices)

  # crosses
  cross_table = _mix_domains(mix, rng.normal(0.0, 1.0, (S, C)), rng.normal(0.0, 1.0, (D, S, C)))
  dense_cross = _mix_domains(mix, np.array([0.8, -0.8]), rng.normal(0.0, 0.8, (D, 2)))

  # higher-order MLP: inputs z (k, rescaled to unit variance), w_a (k), hour sin/cos, placement and
  # device embeddings (2 each); weights N(0, 1/fan_in) times the gain.
  fan_in = 2 * k + 6
  g = cfg.higher_order_gain / np.sqrt(fan_in)
  mlp_user = g * rng.normal(0.0, 1.0, (k, H)) / lat_std
  ad_hidden = ad_latent @ (g * rng.normal(0.0, 1.0, (k, H)) / lat_std)
  mlp_hour = g * rng.normal(0.0, 1.0, (2, H))
  mlp_placement = rng.normal(0.0, 1.0, (P, 2)) @ (g * rng.normal(0.0, 1.0, (2, H)))
  mlp_device = rng.normal(0.0, 1.0, (cfg.num_devices, 2)) @ (g * rng.normal(0.0, 1.0, (2, H)))
  mlp_bias = rng.normal(0.0, 0.5, H)
  mlp_out = _mix_domains(mix, rng.normal(0.0, 1.0, H), rng.normal(0.0, 1.0, (D, H))).T / np.sqrt(H)
  # normalise each domain's output to zero mean, unit variance over random (user, ad, context, time)
  n = 20000
  zs = user_knots[rng.integers(0, U, n), rng.integers(0, user_knots.shape[1], n)]
  hour = rng.uniform(0.0, 2 * np.pi, n)
  pre = (zs @ mlp_user + ad_hidden[rng.integers(0, A, n)] + np.stack([np.sin(hour), np.cos(hour)], 1) @ mlp_hour
         + mlp_placement[rng.integers(0, P, n)] + mlp_device[rng.integers(0, cfg.num_devices, n)] + mlp_bias)
  out = np.tanh(pre) @ mlp_out
  mlp_mean, mlp_std = out.mean(0), np.maximum(out.std(0), 1e-6)

  # candidate sampler: segment-targeted (by category affinity) and global (Zipf popularity) laws
  popularity = (rng.permutation(A) + 1.0) ** -cfg.ad_popularity_exponent
  affinity = rng.normal(0.0, 1.0, (S, C))
  seg_w = popularity[None, :] * np.exp(1.5 * affinity[:, ad_category])
  seg_cdf = np.cumsum(seg_w, axis=1) / seg_w.sum(1, keepdims=True)
  segment_cdf_flat = (seg_cdf + np.arange(S)[:, None]).ravel()
  global_cdf = np.cumsum(popularity) / popularity.sum()
  slot_period_s = np.geomspace(cfg.candidate_refresh_min_s, cfg.candidate_refresh_max_s, K)

  ent = Entities(
      user_segment=user_segment, user_device=user_device, user_activity=user_activity,
      user_activity_x=_standardise(log_act), user_bias=_f32(user_bias), user_cvr_bias=_f32(user_cvr_bias),
      user_start_s=user_start, user_end_s=user_end, user_knots=user_knots,
      ad_advertiser=ad_advertiser, ad_category=ad_category, ad_bias=_f32(ad_bias), ad_cvr_bias=_f32(ad_cvr_bias),
      ad_quality_x=ad_quality_x, ad_price_x=ad_price_x, ad_start_s=ad_start, ad_end_s=ad_end,
      ad_latent=_f32(ad_latent), ad_latent_dom=ad_latent_dom, ad_cvr_latent=_f32(ad_cvr_latent),
      ad_hidden=_f32(ad_hidden), num_evergreen_ads=num_evergreen,
      advertiser_bias=_f32(advertiser_bias), advertiser_cvr_bias=_f32(advertiser_cvr_bias),
      advertiser_category=advertiser_category, delay_family=delay_family, delay_mean1_s=delay_mean1,
      delay_mean2_s=delay_mean2, delay_weight1=delay_weight1, delay_log_median=delay_log_median,
      delay_log_sigma=delay_log_sigma, delay_cdf_window=np.zeros(V),
      domain_mix=mix, domain_cdf=domain_cdf, domain_bias=_f32(domain_bias), domain_cvr_bias=_f32(domain_cvr_bias),
      placement_cdf=placement_cdf, placement_bias=_f32(placement_bias), hour_bias=_f32(hour_bias),
      device_bias=_f32(device_bias), cross_table=cross_table, dense_cross=dense_cross,
      mlp_user=_f32(mlp_user), mlp_hour=_f32(mlp_hour), mlp_placement=_f32(mlp_placement),
      mlp_device=_f32(mlp_device), mlp_bias=_f32(mlp_bias), mlp_out=_f32(mlp_out), mlp_mean=_f32(mlp_mean),
      mlp_std=_f32(mlp_std), segment_cdf_flat=segment_cdf_flat, global_cdf=global_cdf,
      slot_period_s=slot_period_s)
  window = delay_cdf(ent, np.arange(V), cfg.attribution_window_s)
  return dataclasses.replace(ent, delay_cdf_window=window)
