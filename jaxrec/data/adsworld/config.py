"""`AdsWorldConfig`: every knob of the synthetic ads world, with defaults calibrated for ranking work.

Units: times in seconds unless the name says otherwise (`_days`, `_hour`). Scales of logit terms are
standard deviations on the logit scale (each term is normalised to about unit variance first, then
multiplied by its scale), so `low_rank_scale=0.8` means the low-rank term moves the click logit by
about 0.8 nats (one standard deviation) across examples.

The defaults give (seed 0, "eval" stream, 400k examples from its second day; measured with
`batch_with_extras`): click rate about 11% (it follows the diurnal cycle), conversion rate about
1.3% (p(convert | click) about 16%), Bayes (oracle) NE for click 0.808. The best additive
predictor (per-id biases and dense features, no interactions: the true additive logit
recalibrated) has NE 13.1% above the oracle; a predictor that knows everything but the
higher-order term is 1.2% above it. Without the low-rank term alone: +7.7%; without the crosses
alone: +4.8%. docs/BENCHMARKS.md has what trained models reach.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AdsWorldConfig:
  """Static world size, request process, label model and conversion delays. Frozen; hash-stable."""

  seed: int = 0
  """Seeds every entity and stream (>= 0); two worlds with the same config are identical."""

  # ----- population ---------------------------------------------------------------------------
  num_users: int = 1000
  """Users ever present over the horizon (vocab size of `user_id`). The default is sized so a
  ranker sees thousands of examples per user within a few CPU minutes of training (about 20M
  examples), which it needs to learn each user's latent preferences."""
  num_ads: int = 300
  """Ads ever present over the horizon (vocab size of `ad_id`)."""
  num_advertisers: int = 64
  """Advertisers; each owns ads of mostly one category and has its own conversion-delay law."""
  num_ad_categories: int = 24
  """Ad categories (vocab of `ad_category`)."""
  num_user_segments: int = 16
  """User segments (vocab of `user_segment`); the cross table is indexed [segment, category]."""
  num_placements: int = 8
  """Ad placements / slots on the surfaces (vocab of `placement`), drawn per request per domain."""
  num_devices: int = 3
  """Device types (vocab of `device`); a user uses a primary device in most sessions."""
  latent_dim: int = 4
  """Dimension of the user preference z_u(t) and ad latent w_a of the low-rank click term."""

  # ----- domains ------------------------------------------------------------------------------
  num_domains: int = 4
  """Surfaces sharing users and ads; each session happens on one domain."""
  domain_traffic: tuple[float, ...] = (0.5, 0.27, 0.18, 0.05)
  """Share of sessions (hence requests and examples) per domain; the last one is data-poor."""
  domain_agreement: float = 0.8
  """In [0, 1]: weight of the shared part of every interaction term (low-rank, cross, higher-order)
  in each agreeing domain; the rest, sqrt(1 - a^2), is domain-private. 1 = identical label
  functions across domains, 0 = independent ones."""
  conflict_domain: int = 2
  """Domain whose interaction terms conflict with the others (-1 for none)."""
  conflict_strength: float = 0.6
  """In [0, 1]: that domain's interaction terms carry -conflict_strength times the shared part (and
  sqrt(1 - s^2) private), so its correlation with an agreeing domain is -strength * agreement."""

  # ----- time, churn and drift ----------------------------------------------------------------
  horizon_days: float = 60.0
  """World time runs over [0, horizon); t = 0 is a midnight. Streams end at the horizon."""
  user_churn_per_day: float = 0.002
  """Rate at which users leave (exponential lifetimes); new users arrive at the same overall rate so
  the active population stays about constant."""
  ad_churn_per_day: float = 0.005
  """Rate at which ads leave; new ads arrive to keep the active set about constant. Raise both
  churn rates for freshness experiments (ExFM's adapter, streaming training)."""
  evergreen_ad_fraction: float = 0.05
  """Share of ads (the lowest ids) that never churn; the candidate sampler falls back to them."""
  drift_timescale_days: float = 1000.0
  """User preferences z_u(t) follow an Ornstein-Uhlenbeck walk with this correlation time: over a
  day a preference moves by about sqrt(2 / T) of its norm (4.5% for the default T = 1000; T = 60
  gives 18%). Larger = slower drift. The default is slow so that a static ranker trained over
  several world-days can approach the oracle; staleness experiments turn it up."""
  drift_knot_s: float = 21600.0
  """z_u(t) is stored at knots this far apart and linearly interpolated between them."""

  # ----- request process (ERCache's gaps) -----------------------------------------------------
  sessions_per_user_per_day: float = 6.0
  """Mean rate of sessions (bursts) per active user per day, before the activity multiplier."""
  activity_sigma: float = 0.8
  """Log-normal spread of per-user activity (session-rate multiplier, mean 1)."""
  session_mean_requests: float = 4.2
  """Mean requests per session (1 + geometric). (mean - 1) / mean of all gaps are within-session."""
  gap_short_weight: float = 0.62
  """Share of within-session gaps drawn from the short exponential; the rest are log-normal."""
  gap_short_mean_s: float = 12.0
  """Mean of the short within-session gaps (scrolling)."""
  gap_medium_median_s: float = 185.0
  """Median of the medium (log-normal) within-session gaps (coming back after a few minutes)."""
  gap_medium_sigma: float = 1.0
  """Log-space sigma of the medium gaps."""
  diurnal_amplitude: float = 0.5
  """Session rate is modulated by 1 + a cos(2 pi (hour - peak) / 24)."""
  diurnal_peak_hour: float = 20.0
  """Hour of day of peak traffic."""
  primary_device_prob: float = 0.85
  """Probability that a session uses the user's primary device."""

  # ----- candidates ---------------------------------------------------------------------------
  candidates_per_request: int = 32
  """K, ads scored per request; a batch of B examples covers B / K requests."""
  candidate_refresh_min_s: float = 60.0
  """Candidate slot j keeps its ad for a period T_j; periods are log-spaced from this ..."""
  candidate_refresh_max_s: float = 86400.0
  """... to this. Two requests of a user `g` seconds apart share about mean_j max(0, 1 - g / T_j)
  of their candidates (about 90% at 30 s, 40% at one hour)."""
  candidate_targeting: float = 0.5
  """Share of candidates drawn from the user's segment-targeted distribution (vs global popularity)."""
  ad_popularity_exponent: float = 0.6
  """Zipf exponent of the global ad popularity used by the candidate sampler."""

  # ----- click logit: additive part -----------------------------------------------------------
  click_bias: float = -3.0
  """Global click logit bias (sets the click rate, about 11% with the defaults)."""
  domain_bias_std: float = 0.3
  """Std of per-domain click biases."""
  user_bias_std: float = 0.7
  """Std of per-user click biases."""
  ad_bias_std: float = 0.55
  """Std of per-ad click biases."""
  advertiser_bias_std: float = 0.25
  """Std of per-advertiser click biases."""
  context_bias_std: float = 0.15
  """Std of per-placement, per-hour and per-device click biases."""
  activity_weight: float = 0.15
  """Click-logit weight of the dense `user_activity` feature."""
  price_weight: float = -0.1
  """Click-logit weight of the dense `ad_price` feature."""

  # ----- click logit: interaction terms (the capacity gap) ------------------------------------
  low_rank_scale: float = 0.7
  """(a) Scale of <z_u(t), w_a^d>: learnable by user and ad embeddings (dot product)."""
  cross_scale: float = 0.45
  """(b) Scale of the explicit crosses C_d[segment, category] + dense x dense products: learnable by
  a DCN cross layer over the segment / category embeddings and dense features."""
  dense_cross_weight: float = 0.6
  """Share (relative std) of the dense x dense products inside the cross term."""
  higher_order_scale: float = 0.3
  """(c) Scale of a fixed random 2-layer tanh MLP over (z_u(t), w_a, context): only a wide, deep
  model captures it. This is the capacity-gap knob; keep it modest for ranking work."""
  higher_order_hidden: int = 32
  """Hidden width of that MLP."""
  higher_order_gain: float = 2.0
  """Input gain of the MLP's tanh layer (larger = more nonlinear)."""

  # ----- conversion ---------------------------------------------------------------------------
  cvr_bias: float = -2.2
  """Global logit bias of p(convert eventually | click)."""
  cvr_domain_bias_std: float = 0.2
  """Std of per-domain conversion biases."""
  cvr_user_bias_std: float = 0.4
  """Std of per-user conversion biases."""
  cvr_user_bias_share: float = 0.5
  """Correlation of a user's conversion bias with their click bias."""
  cvr_ad_bias_std: float = 0.3
  """Std of per-ad conversion biases."""
  cvr_advertiser_bias_std: float = 0.4
  """Std of per-advertiser conversion biases."""
  cvr_low_rank_scale: float = 0.5
  """Scale of <z_u(t), v_a>, v_a correlated (`cvr_latent_share`) with the click latent w_a."""
  cvr_latent_share: float = 0.6
  """Correlation of the conversion ad latent v_a with the click ad latent w_a."""
  cvr_price_weight: float = -0.4
  """Conversion-logit weight of `ad_price` (expensive products convert less)."""
  attribution_window_s: float = 86400.0
  """The `conversion` label is click AND converted within this delay after the click."""

  # ----- conversion delays, one law per advertiser --------------------------------------------
  delay_family_weights: tuple[float, ...] = (0.5, 0.3, 0.2)
  """Shares of advertisers whose delay is (exponential, mixture of fast and slow exponentials,
  log-normal)."""
  delay_exp_mean_s: tuple[float, float] = (3600.0, 172800.0)
  """Range (log-uniform) of the mean delay of exponential advertisers."""
  delay_fast_mean_s: tuple[float, float] = (600.0, 7200.0)
  """Range (log-uniform) of the fast component's mean of mixture advertisers."""
  delay_slow_mean_s: tuple[float, float] = (172800.0, 864000.0)
  """Range (log-uniform) of the slow component's mean of mixture advertisers."""
  delay_fast_weight: tuple[float, float] = (0.3, 0.7)
  """Range (uniform) of the fast component's weight of mixture advertisers."""
  delay_lognormal_median_s: tuple[float, float] = (7200.0, 172800.0)
  """Range (log-uniform) of the median delay of log-normal advertisers."""
  delay_lognormal_sigma: tuple[float, float] = (1.0, 2.0)
  """Range (uniform) of the log-space sigma of log-normal advertisers."""

  # ----- features -----------------------------------------------------------------------------
  num_noise_features: int = 2
  """Dense features that are pure N(0, 1) noise, independent of the labels."""

  def __post_init__(self):
    if self.seed < 0:
      raise ValueError(f"AdsWorldConfig.seed must be >= 0, got {self.seed}")
    positive = ("num_users", "num_ads", "num_advertisers", "num_ad_categories", "num_user_segments",
                "num_placements", "num_devices", "latent_dim", "num_domains", "candidates_per_request",
                "higher_order_hidden", "horizon_days", "drift_timescale_days", "drift_knot_s",
                "sessions_per_user_per_day", "session_mean_requests", "gap_short_mean_s",
                "gap_medium_median_s", "candidate_refresh_min_s", "attribution_window_s")
    for name in positive:
      if not getattr(self, name) > 0:
        raise ValueError(f"AdsWorldConfig.{name} must be > 0, got {getattr(self, name)}")
    if len(self.domain_traffic) != self.num_domains:
      raise ValueError(f"AdsWorldConfig.domain_traffic has {len(self.domain_traffic)} shares but "
                       f"num_domains is {self.num_domains}")
    if min(self.domain_traffic) <= 0:
      raise ValueError(f"AdsWorldConfig.domain_traffic must be > 0, got {self.domain_traffic}")
    if not -1 <= self.conflict_domain < self.num_domains:
      raise ValueError(f"AdsWorldConfig.conflict_domain must be -1 or a domain id, got {self.conflict_domain}")
    for name in ("domain_agreement", "conflict_strength", "candidate_targeting", "gap_short_weight",
                 "evergreen_ad_fraction", "primary_device_prob", "cvr_user_bias_share", "cvr_latent_share",
                 "diurnal_amplitude"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"AdsWorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")
    if self.gap_medium_sigma < 0:
      raise ValueError(f"AdsWorldConfig.gap_medium_sigma must be >= 0, got {self.gap_medium_sigma}")
    if self.session_mean_requests < 1.0:
      raise ValueError(f"AdsWorldConfig.session_mean_requests must be >= 1, got {self.session_mean_requests}")
    if self.candidate_refresh_max_s < self.candidate_refresh_min_s:
      raise ValueError("AdsWorldConfig.candidate_refresh_max_s must be >= candidate_refresh_min_s")
    if self.candidates_per_request > self.num_ads:
      raise ValueError(f"AdsWorldConfig.candidates_per_request ({self.candidates_per_request}) exceeds "
                       f"num_ads ({self.num_ads})")
    if len(self.delay_family_weights) != 3 or min(self.delay_family_weights) < 0:
      raise ValueError("AdsWorldConfig.delay_family_weights must be 3 non-negative shares")
    if self.drift_knot_s > self.horizon_days * 86400.0:
      raise ValueError("AdsWorldConfig.drift_knot_s must not exceed the horizon")

  @property
  def horizon_s(self) -> float:
    return self.horizon_days * 86400.0

  @classmethod
  def small(cls, seed: int = 0) -> "AdsWorldConfig":
    """A small world for tests: builds in milliseconds, same laws as the defaults."""
    return cls(seed=seed, num_users=500, num_ads=200, num_advertisers=16, num_ad_categories=8,
               num_user_segments=6, horizon_days=7.0)
