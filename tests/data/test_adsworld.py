"""The synthetic ads world: determinism, schema, truth/label consistency and its calibrated laws."""

from __future__ import annotations

import dataclasses
import doctest

import numpy as np
import pytest

import jaxrec.data.adsworld as adsworld
from jaxrec.data.adsworld import EXPONENTIAL, AdsWorld, AdsWorldConfig
from jaxrec.data.adsworld.labels import sigmoid
from jaxrec.data.batch import Batch
from jaxrec.data.examples import Examples


@pytest.fixture(scope="module")
def world() -> AdsWorld:
  return AdsWorld(AdsWorldConfig())


@pytest.fixture(scope="module")
def big(world):
  """About 100k eval examples with their extras."""
  parts = [world.batch_with_extras("eval", i, 16384) for i in range(40, 46)]
  batch = Batch(**{f.name: np.concatenate([getattr(b, f.name) for b, _ in parts])
                   for f in dataclasses.fields(Batch)})
  extras = {k: np.concatenate([x[k] for _, x in parts]) for k in parts[0][1]}
  return batch, extras


def _fields(batch: Batch) -> dict[str, np.ndarray]:
  return {f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}


def _user_gaps(user_id: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(gaps between a user's consecutive requests, index of the earlier request in lexsort order)."""
  order = np.lexsort((t, user_id))
  same = user_id[order][1:] == user_id[order][:-1]
  return np.diff(t[order])[same], order


def test_module_doctest():
  assert doctest.testmod(adsworld, raise_on_error=True).attempted > 0


def test_deterministic_and_split_dependent():
  cfg = AdsWorldConfig.small()
  a, b = AdsWorld(cfg), AdsWorld(cfg)
  fa, fb = _fields(a.batch("train", 3, 256)), _fields(b.batch("train", 3, 256))
  for name in fa:
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)
  ev = a.batch("eval", 3, 256)
  assert not np.array_equal(fa["sparse"], ev.sparse)
  assert not np.array_equal(a.batch("train", 4, 256).sparse, fa["sparse"])
  other_seed = AdsWorld(AdsWorldConfig.small(seed=1)).batch("train", 3, 256)
  assert not np.array_equal(other_seed.sparse, fa["sparse"])


def test_examples_do_not_depend_on_batching():
  w = AdsWorld(AdsWorldConfig.small())
  whole = _fields(w.batch("train", 0, 200))
  halves = [_fields(w.batch("train", i, 100)) for i in (0, 1)]
  for name in whole:
    np.testing.assert_array_equal(whole[name], np.concatenate([h[name] for h in halves]), err_msg=name)


def test_examples_do_not_depend_on_batch_size_bit_for_bit():
  # BLAS blocks a matmul by its row count, so a row's product could change with the batch size (the
  # higher-order click term moved by 1 ulp at batch size 37): true_prob, and rarely a label, with it
  w = AdsWorld(AdsWorldConfig.small())
  whole = _fields(w.examples("train", 0, 2000)[0])
  for size in (1, 3, 7, 37, 64, 333):
    parts = [_fields(w.batch("train", i, size)) for i in range(min(2000 // size, 40))]
    for name in whole:
      got = np.concatenate([p[name] for p in parts])
      np.testing.assert_array_equal(got, whole[name][:len(got)], err_msg=f"{name}, batch size {size}")


def test_schema_shapes_dtypes_and_vocab(world):
  s = world.schema
  assert s.labels == ("click", "conversion") and s.num_domains == world.cfg.num_domains
  assert [f.name for f in s.sparse] == ["user_id", "ad_id", "advertiser_id", "ad_category", "user_segment",
                                        "placement", "hour", "device", "domain"]
  assert [f.vocab_size for f in s.sparse][:4] == [1000, 300, 64, 24]
  assert s.dense[-2:] == ("noise_0", "noise_1") and s.max_len == 1
  b = world.batch("train", 7, 1000)
  Examples(s, b, "adsworld")  # validates shapes, vocabularies, labels and domains
  want = {"dense": np.float32, "sparse": np.int32, "sparse_mask": np.bool_, "labels": np.float32,
          "weights": np.float32, "domain": np.int32, "timestamp": np.int32, "true_prob": np.float32}
  for name, dtype in want.items():
    assert getattr(b, name).dtype == dtype, name
  assert b.sparse_mask.all() and (b.weights == 1).all()
  assert np.all((b.true_prob > 0) & (b.true_prob < 1)) and np.isfinite(b.dense).all()
  assert np.all(np.diff(b.timestamp) >= 0)  # requests in time order


def test_labels_match_true_prob(big):
  b, x = big
  n = b.labels.shape[0]
  for j in range(2):
    p = b.true_prob[:, j].astype(np.float64)
    se = np.sqrt(np.sum(p * (1 - p))) / n
    assert abs(b.labels[:, j].mean() - p.mean()) < 4 * se, j
  # binned calibration of the click label
  p = b.true_prob[:, 0].astype(np.float64)
  bins = np.quantile(p, [0, 0.25, 0.5, 0.75, 0.9, 1.0])
  which = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 4)
  for k in range(5):
    m = which == k
    se = np.sqrt(np.sum(p[m] * (1 - p[m]))) / m.sum()
    assert abs(b.labels[m, 0].mean() - p[m].mean()) < 4.5 * se, k
  # the default world's calibration targets
  assert 0.06 < b.labels[:, 0].mean() < 0.16
  assert 0.001 < b.labels[:, 1].mean() < b.labels[:, 0].mean()
  # true_prob[:, 0] is the sigmoid of the reported logit terms
  logit = x["logit_additive"] + x["logit_low_rank"] + x["logit_cross"] + x["logit_higher_order"]
  np.testing.assert_allclose(b.true_prob[:, 0], sigmoid(logit), rtol=1e-5, atol=1e-7)


def test_conversion_label_and_extras(world, big):
  b, x = big
  click, conv = b.labels[:, 0] == 1, b.labels[:, 1] == 1
  assert not np.any(conv & ~click)
  np.testing.assert_array_equal(click, x["click"])
  assert np.all(np.isinf(x["conversion_delay_s"][~click]))
  np.testing.assert_array_equal(conv, x["conversion_delay_s"] <= world.cfg.attribution_window_s)
  np.testing.assert_allclose(
      b.true_prob[:, 1], x["p_click"] * x["p_cvr"] * world.delay_cdf(x["advertiser_id"], world.cfg.attribution_window_s),
      rtol=1e-5)
  np.testing.assert_array_equal(x["user_id"], b.sparse[:, 0, 0])
  np.testing.assert_array_equal(x["ad_id"], b.sparse[:, 1, 0])
  np.testing.assert_array_equal(x["advertiser_id"], b.sparse[:, 2, 0])
  assert np.all(np.diff(x["request_id"]) >= 0)
  # a later window converts at least as often, as delay_cdf says
  week = x["click"] & (x["conversion_delay_s"] <= 7 * 86400)
  assert week.sum() > conv.sum()


def test_request_gaps_match_ercache(world):
  r = world.request_stream(1000, 8 * 86400.0, seed=0)
  assert np.all(np.diff(r.timestamp_s) >= 0) and r.user_id.max() < 1000
  gaps, _ = _user_gaps(r.user_id, r.timestamp_s)
  assert gaps.size > 100_000
  assert abs(np.mean(gaps < 60) - 0.52) < 0.03
  assert abs(np.mean(gaps < 600) - 0.76) < 0.03
  # the training log follows the same law
  log = world.requests("train", 0.0, 86400.0)
  gaps, _ = _user_gaps(log.user_id, log.timestamp_s)
  assert abs(np.mean(gaps < 60) - 0.52) < 0.03 and abs(np.mean(gaps < 600) - 0.76) < 0.03


def test_candidates_repeat_across_nearby_requests(world):
  log = world.requests("train", 0.0, 6 * 3600.0)
  ent = world.entities
  order = np.lexsort((log.timestamp_s, log.user_id))[:6000]
  u, t = log.user_id[order], log.timestamp_s[order]
  c = world.candidates(u, t)
  K = world.cfg.candidates_per_request
  assert c.shape == (u.size, K)
  # no repeats inside a list, and only ads active at the request time
  assert np.all(np.diff(np.sort(c, axis=1), axis=1) > 0)
  assert np.all((ent.ad_start_s[c] <= t[:, None]) & (t[:, None] < ent.ad_end_s[c]))
  same, gap = u[1:] == u[:-1], np.diff(t)
  overlap = np.array([np.intersect1d(c[i], c[i + 1]).size / K for i in range(u.size - 1)])
  near, far = same & (gap < 60), same & (gap > 3600)
  assert near.sum() > 500 and far.sum() > 50
  assert overlap[near].mean() > 0.85
  assert 0.05 < overlap[far].mean() < overlap[near].mean() - 0.3
  # partial overlap: requests seconds apart still differ somewhat in the short-period slots
  assert overlap[same & (gap > 20) & (gap < 60)].mean() < 1.0
  # a batch's candidates are its requests' candidate lists
  b, x = world.batch_with_extras("train", 0, 4 * K)
  reqs = world.request_slice("train", 0, 4)
  np.testing.assert_array_equal(x["ad_id"].reshape(4, K), world.candidates(reqs.user_id, reqs.timestamp_s))


def test_delay_families(world):
  adv = np.arange(world.cfg.num_advertisers)
  fam = world.delay_family(adv)
  assert set(np.unique(fam)) == {0, 1, 2}
  n = 20000
  d = world.sample_delays(np.repeat(adv, n), seed=0).reshape(adv.size, n)
  assert np.all(d > 0)
  q50, q99 = np.quantile(d, [0.5, 0.99], axis=1)
  ratio = q99 / q50
  # exponential: q99 / q50 = log(100) / log(2) = 6.64; the mixtures and log-normals are heavier-tailed
  assert np.all(np.abs(ratio[fam == EXPONENTIAL] - 6.64) < 0.8)
  assert np.all(ratio[fam != EXPONENTIAL] > 8.0)
  # delay_cdf is the exact law of the sampled delays, for any window
  for w in (3600.0, 86400.0, 7 * 86400.0):
    cdf = world.delay_cdf(adv, w)
    np.testing.assert_allclose(np.mean(d <= w, axis=1), cdf, atol=4.5 * np.sqrt(0.25 / n))
  assert world.delay_cdf(adv, 0.0).max() == 0.0
  assert np.all(world.delay_cdf(adv, 1e9) > 0.999)


def test_domain_traffic_shares(world):
  log = world.requests("eval", 0.0, 3 * 86400.0)
  share = np.bincount(log.domain, minlength=world.cfg.num_domains) / len(log)
  np.testing.assert_allclose(share, world.cfg.domain_traffic, atol=0.015)
  assert share.argmin() == world.cfg.num_domains - 1  # the data-poor domain


def test_domains_agree_except_the_conflicting_one(world, big):
  from jaxrec.data.adsworld.labels import click_terms, hour_angle, user_latent

  cfg, ent = world.cfg, world.entities
  reqs = world.request_slice("eval", 0, 1000)
  t = reqs.timestamp_s
  ang = hour_angle(t)
  req = {"user_id": reqs.user_id.astype(np.int64), "device": reqs.device.astype(np.int64),
         "placement": reqs.placement.astype(np.int64), "hour": (np.mod(t, 86400) // 3600).astype(np.int64),
         "hour_sin": np.sin(ang).astype(np.float32), "hour_cos": np.cos(ang).astype(np.float32)}
  z = user_latent(cfg, ent, reqs.user_id, t)
  ads = world.candidates(reqs.user_id, t)
  ex_req = np.repeat(np.arange(len(reqs)), ads.shape[1])
  inter = []
  for d in range(cfg.num_domains):
    terms = click_terms(cfg, ent, {**req, "domain": np.full(len(reqs), d)}, z, ex_req, ads.ravel().astype(np.int64))
    inter.append(terms["low_rank"] + terms["cross"] + terms["higher_order"])
  corr = np.corrcoef(inter)
  agree = [d for d in range(cfg.num_domains) if d != cfg.conflict_domain]
  for i in agree:
    for j in agree:
      if i < j:
        assert 0.45 < corr[i, j] < 0.85, (i, j)
    assert corr[i, cfg.conflict_domain] < -0.2


def test_default_drift_is_slow(world):
  u = np.arange(500)
  z0 = world.user_latent(u, np.zeros(500))
  day = np.linalg.norm(world.user_latent(u, np.full(500, 86400.0)) - z0) / np.linalg.norm(z0)
  want = np.sqrt(2.0 / world.cfg.drift_timescale_days)
  assert 0.5 * want < day < 2.0 * want


def test_preferences_drift():
  world = AdsWorld(AdsWorldConfig(drift_timescale_days=60.0))
  u = np.arange(500)
  z0 = world.user_latent(u, np.zeros(500))
  rel = lambda z: np.linalg.norm(z - z0) / np.linalg.norm(z0)  # noqa: E731
  assert rel(world.user_latent(u, np.full(500, 60.0))) < 0.01
  assert 0.1 < rel(world.user_latent(u, np.full(500, 86400.0))) < 0.3
  assert rel(world.user_latent(u, np.full(500, 7 * 86400.0))) > 0.35
  # stationary scale: norms do not grow over the horizon
  z_end = world.user_latent(u, np.full(500, 27 * 86400.0))
  assert abs(np.linalg.norm(z_end) / np.linalg.norm(z0) - 1.0) < 0.15


def test_churn_only_active_users_request(world):
  ent = world.entities
  log = world.requests("train", 5 * 86400.0, 5.5 * 86400.0)
  start, end = ent.user_start_s[log.user_id], ent.user_end_s[log.user_id]
  assert np.all(start <= log.timestamp_s) and np.all(log.timestamp_s < end + 21600.0)
  assert np.any(ent.user_start_s > 0) and np.any(np.isfinite(ent.user_end_s))
  assert np.any((ent.ad_start_s > 0) & (ent.ad_start_s < 5 * 86400.0))  # new ads arrive


def test_stream_ends_at_horizon():
  w = AdsWorld(dataclasses.replace(AdsWorldConfig.small(), horizon_days=0.5))
  n = w.num_examples("train")
  assert n > 0 and n % w.cfg.candidates_per_request == 0
  last = w.examples("train", n - 10, n)[0]
  assert last.labels.shape == (10, 2) and last.timestamp.max() < 0.5 * 86400
  with pytest.raises(IndexError):
    w.examples("train", n - 10, n + 1)


def test_config_validation():
  with pytest.raises(ValueError, match="domain_traffic"):
    AdsWorldConfig(num_domains=3)
  with pytest.raises(ValueError, match="conflict_domain"):
    AdsWorldConfig(conflict_domain=7)
  with pytest.raises(ValueError, match="num_users"):
    AdsWorldConfig(num_users=0)


def test_threads_sharing_a_world_get_the_same_batches():
  """grain's prefetch threads share one AdsWorld; its page caches must not mix batches up."""
  from concurrent.futures import ThreadPoolExecutor
  cfg = AdsWorldConfig()
  idx = list(range(0, 240, 7))
  alone = AdsWorld(cfg)
  want = [alone.batch("train", i, 512) for i in idx]
  shared = AdsWorld(cfg)
  with ThreadPoolExecutor(4) as ex:
    got = list(ex.map(lambda i: shared.batch("train", i, 512), idx))
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a.sparse, b.sparse)
    np.testing.assert_array_equal(a.labels, b.labels)
