"""Dispatch: the per-GEMM rule on synthetic MERE and timings, the untimed (CPU) rule, the timing
cache, autotune's correctness check (negative control: a wrong operand), the aggregate."""

import doctest
import json

import jax
import jax.numpy as jnp
import pytest

from jaxrec.precision import dispatch
from jaxrec.precision.dispatch import (BASELINE, DEFAULT_BOUND, DEFAULT_REGISTRY, DispatchCandidate, GemmShape,
                                       Registry, Timings, TimingCache, aggregate, autotune, choose_gemm,
                                       make_plan, site_shapes)
from jaxrec.precision.error_model import CANDIDATES, GEMMS, Gaussian, MatrixNormal, MereEstimate, mere, mere_for_site
from jaxrec.precision.plan import GemmChoice, PrecisionPlan

on_gpu = jax.default_backend() == "gpu"
FP8 = ("fp8_tensor", "fp8_row", "fp8_block")


def est(v: float, spread: float = 0.01) -> MereEstimate:
  """A MERE estimate with mean v and a small interval (high a little above v)."""
  return MereEstimate.from_values([v * (1 - spread), v, v * (1 + spread)])


def site_mere(fp8: float | dict = 0.04, bf16: float = 0.002) -> dict:
  """{numerics: {gemm: est}}: every fp8 recipe at `fp8` (a value, or {numerics: value or {gemm: value}})."""
  def per_gemm(v):
    return {g: est(v[g] if isinstance(v, dict) else v) for g in GEMMS}
  vals = fp8 if isinstance(fp8, dict) else dict.fromkeys(FP8, fp8)
  return {"bf16": per_gemm(bf16), **{n: per_gemm(v) for n, v in vals.items()}}


def timings_for(shapes, us: dict) -> Timings:
  """Every shape gets the same {candidate: us} (bf16 at 100 unless given)."""
  return Timings("synthetic H100", {s: {BASELINE: 100.0, **us} for s in shapes})


SHAPE = GemmShape("fwd", 512, 256, 128)


def test_docstring():
  assert doctest.testmod(dispatch).failed == 0


# --------------------------------------------------------------------------------------------
# The timed rule


def test_mere_over_bound_excluded_even_when_fastest():
  t = timings_for([SHAPE], {"pallas_fp8_tensor": 20.0, "pallas_fp8_row": 50.0, "pallas_fp8_block": 60.0})
  m = site_mere({"fp8_tensor": 0.3, "fp8_row": 0.04, "fp8_block": 0.04})
  row = choose_gemm("s", SHAPE, m, t)
  assert row.candidate == "pallas_fp8_row"
  assert row.choice == GemmChoice("fp8_row", "pallas")
  assert row.speedup == pytest.approx(2.0)
  assert row.mere.mean == pytest.approx(0.04)
  # the bound is configurable: at 0.5 the 5x candidate is admitted
  assert choose_gemm("s", SHAPE, m, t, bound=0.5).candidate == "pallas_fp8_tensor"


def test_bound_is_on_the_upper_end_of_the_interval():
  t = timings_for([SHAPE], {"pallas_fp8_row": 50.0})
  wide = {**site_mere(0.5), "fp8_row": {g: MereEstimate.from_values([0.08, 0.09, 0.10, 0.11]) for g in GEMMS}}
  e = wide["fp8_row"]["fwd"]
  assert e.mean < DEFAULT_BOUND < e.high  # mean under the bound, upper end over it
  assert choose_gemm("s", SHAPE, wide, t).candidate == BASELINE
  assert choose_gemm("s", SHAPE, wide, t, bound=e.high + 1e-6).candidate == "pallas_fp8_row"
  one = {**site_mere(0.5), "fp8_row": {g: MereEstimate.from_values([0.01]) for g in GEMMS}}  # high = inf
  assert choose_gemm("s", SHAPE, one, t).candidate == BASELINE


def test_bound_is_strict_at_the_upper_end():
  """"MERE upper end < bound": an estimate whose upper end equals the bound is refused (timed and
  untimed), one just above it admitted."""
  t = timings_for([SHAPE], {"pallas_fp8_row": 50.0})
  m = site_mere(0.05)
  high = m["fp8_row"]["fwd"].high
  assert m["fp8_tensor"]["fwd"].high == m["fp8_block"]["fwd"].high == high
  assert choose_gemm("s", SHAPE, m, t, bound=high).candidate == BASELINE
  assert choose_gemm("s", SHAPE, m, t, bound=high * (1 + 1e-9)).candidate == "pallas_fp8_row"
  assert choose_gemm("s", SHAPE, m, None, bound=high).candidate == BASELINE
  assert choose_gemm("s", SHAPE, m, None, bound=high * (1 + 1e-9)).candidate == "xla_fp8_tensor"


def test_speedup_must_exceed_threshold():
  m = site_mere(0.04)
  at = timings_for([SHAPE], {BASELINE: 105.0, "pallas_fp8_row": 100.0, "xla_fp8_tensor": 120.0})  # 1.05 exactly
  row = choose_gemm("s", SHAPE, m, at)
  assert (row.candidate, row.speedup) == (BASELINE, 1.0)
  above = timings_for([SHAPE], {"pallas_fp8_row": 100.0 / 1.06})
  assert choose_gemm("s", SHAPE, m, above).candidate == "pallas_fp8_row"
  assert choose_gemm("s", SHAPE, m, above, min_speedup=1.1).candidate == BASELINE


def test_fastest_eligible_chosen_and_ties_by_registry_order():
  m = site_mere(0.04)
  t = timings_for([SHAPE], {"xla_fp8_tensor": 80.0, "xla_fp8_row": 70.0, "pallas_fp8_row": 40.0,
                            "pallas_fp8_block": 45.0, "pallas_fp8_tensor": 90.0})
  assert choose_gemm("s", SHAPE, m, t).candidate == "pallas_fp8_row"
  tie = timings_for([SHAPE], {"xla_fp8_row": 40.0, "pallas_fp8_row": 40.0})
  assert choose_gemm("s", SHAPE, m, tie).candidate == "xla_fp8_row"  # XLA precedes Pallas


def test_missing_timing_or_mere_is_not_eligible():
  t = timings_for([SHAPE], {"pallas_fp8_row": 10.0, "pallas_fp8_block": None, "xla_fp8_block": 50.0})
  no_row = {k: v for k, v in site_mere(0.04).items() if k != "fp8_row"}
  assert choose_gemm("s", SHAPE, no_row, t).candidate == "xla_fp8_block"  # block Pallas unsupported
  assert choose_gemm("s", SHAPE, None, t).candidate == BASELINE  # a site the error model did not see
  untimed_base = Timings("x", {SHAPE: {"pallas_fp8_row": 10.0}})
  row = choose_gemm("s", SHAPE, site_mere(0.04), untimed_base)
  assert (row.candidate, row.speedup, row.as_dict()["speedup"]) == (BASELINE, None, "not timed")


def test_fwd_dgrad_wgrad_chosen_independently():
  sites = [("top.0", 256, 128)]
  shapes = {s.gemm: s for s in site_shapes(sites, batch=1024)}
  t = Timings("synthetic H100", {
      shapes["fwd"]: {BASELINE: 100.0, "pallas_fp8_row": 60.0, "pallas_fp8_block": 70.0},
      shapes["dgrad"]: {BASELINE: 100.0, "pallas_fp8_row": 50.0, "pallas_fp8_block": 50.0},
      shapes["wgrad"]: {BASELINE: 100.0, "pallas_fp8_row": 90.0, "pallas_fp8_block": 80.0}})
  m = {"top.0": site_mere({"fp8_tensor": 0.04, "fp8_row": {"fwd": 0.04, "dgrad": 0.3, "wgrad": 0.06},
                           "fp8_block": {"fwd": 0.04, "dgrad": 0.3, "wgrad": 0.06}})}
  plan, rows = make_plan(sites, m, batch=1024, timings=t)
  site = plan.site("top.0")
  assert site.fwd == GemmChoice("fp8_row", "pallas")
  assert site.dgrad == GemmChoice("bf16", "xla")  # fast but over the bound
  assert site.wgrad == GemmChoice("fp8_block", "pallas")
  assert [(r.site, r.shape.gemm, r.candidate) for r in rows] == [
      ("top.0", "fwd", "pallas_fp8_row"), ("top.0", "dgrad", BASELINE), ("top.0", "wgrad", "pallas_fp8_block")]
  assert [r.shape for r in rows] == [shapes[g] for g in GEMMS]
  d = rows[2].as_dict()
  assert (d["gemm"], d["m"], d["k"], d["n"]) == ("wgrad", 1024, 256, 128)
  assert (d["numerics"], d["impl"]) == ("fp8_block", "pallas")
  assert d["speedup"] == pytest.approx(1.25) and d["mere"]["high"] > d["mere"]["mean"] == pytest.approx(0.06)
  assert PrecisionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
  json.dumps([r.as_dict() for r in rows])  # the report is JSON


def test_shapes_and_arguments_validated():
  with pytest.raises(ValueError, match="unknown GEMM"):
    GemmShape("bwd", 1, 2, 3)
  with pytest.raises(ValueError, match="dtype"):
    GemmShape("fwd", 1, 2, 3, "float16")
  with pytest.raises(ValueError, match="unique"):
    make_plan([("a", 4, 4), ("a", 8, 8)], {}, batch=2)
  with pytest.raises(ValueError, match="positive"):
    choose_gemm("s", SHAPE, None, None, bound=0.0)
  assert GemmShape("wgrad", 64, 32, 16).operand_shapes == ((64, 32), (64, 16))
  assert len(site_shapes([("a", 32, 16), ("b", 32, 16), ("c", 16, 8)], batch=64)) == 6  # equal shapes shared


# --------------------------------------------------------------------------------------------
# The untimed (CPU) rule


def test_untimed_rule_lowest_mere_xla_fp8_under_bound():
  m = site_mere({"fp8_tensor": 0.07, "fp8_row": 0.05, "fp8_block": 0.06})
  row = choose_gemm("s", SHAPE, m, None)
  assert (row.candidate, row.choice, row.speedup) == ("xla_fp8_row", GemmChoice("fp8_row", "xla"), None)
  assert row.as_dict()["speedup"] == "not timed"
  assert choose_gemm("s", SHAPE, site_mere(0.15), None).candidate == BASELINE
  tie = site_mere(0.05)
  assert choose_gemm("s", SHAPE, tie, None).candidate == "xla_fp8_tensor"  # ties: registry order
  only_pallas = DEFAULT_REGISTRY.select(["pallas_fp8_row"])
  assert choose_gemm("s", SHAPE, m, None, registry=only_pallas).candidate == BASELINE  # Pallas is never untimed


def test_untimed_rule_ranks_by_the_upper_end_not_the_mean():
  """A noisy estimate with the lower mean loses to a tight one with the lower upper end."""
  wide = MereEstimate.from_values([0.02, 0.03, 0.04])    # mean 0.03, high 0.055
  tight = MereEstimate.from_values([0.039, 0.04, 0.041])  # mean 0.04, high 0.0425
  assert wide.mean < tight.mean and tight.high < wide.high < DEFAULT_BOUND
  m = {"bf16": site_mere()["bf16"], "fp8_tensor": dict.fromkeys(GEMMS, wide), "fp8_row": dict.fromkeys(GEMMS, tight)}
  assert choose_gemm("s", SHAPE, m, None).candidate == "xla_fp8_row"


@pytest.fixture(scope="module")
def probe_mere():
  """Error-model MERE of two sites: N(0, 1) operands, and inputs with mean 8 against centred weight
  columns (mean cancellation: forward MERE ~ 8x the FP8 floor, gradients unaffected)."""
  k, n = 64, 32
  u = jnp.eye(k) - jnp.ones((k, k)) / k
  kw = dict(candidates=("bf16", "fp8_row"), num_samples=4, batch=32)  # the others: no MERE, not eligible
  return {"plain": mere_for_site(jax.random.key(1), Gaussian.standard(k), MatrixNormal.standard(k, n), **kw),
          "shifted": mere_for_site(jax.random.key(2), Gaussian(jnp.full((k,), 8.0), jnp.eye(k)),
                                   MatrixNormal(jnp.zeros((k, n)), u, jnp.eye(n)), **kw)}


def test_untimed_plan_from_error_model_is_deterministic(probe_mere):
  sites = [("plain", 64, 32), ("shifted", 64, 32)]
  plan, rows = make_plan(sites, probe_mere, batch=32)
  again, rows2 = make_plan(sites, probe_mere, batch=32)
  assert plan == again and rows == rows2
  assert all(plan.site("plain").gemm(g) == GemmChoice("fp8_row", "xla") for g in GEMMS)
  shifted = plan.site("shifted")
  assert shifted.fwd == GemmChoice("bf16", "xla")
  assert shifted.dgrad.is_fp8 and shifted.wgrad.is_fp8
  assert all(r.speedup is None for r in rows)
  fwd = next(r for r in rows if (r.site, r.shape.gemm) == ("shifted", "fwd"))
  assert fwd.mere.high < DEFAULT_BOUND  # the bf16 row reports bf16's MERE
  assert probe_mere["shifted"]["fp8_row"]["fwd"].low > DEFAULT_BOUND  # and FP8 was clearly over it


# --------------------------------------------------------------------------------------------
# Registry, builders, autotune and its cache


def test_registry_builders_compute_the_error_model_numerics():
  """Each registry GEMM (the layer's routing, operands as the layer holds them) equals the error
  model's candidate for its numerics on the GEMM-layout operands. The operand routing per GEMM is
  shared by all recipes and impls, so: every XLA recipe forward, one FP8 recipe per gradient GEMM,
  and Pallas once (interpreter; the GEMM with the most transposes)."""
  names = {"fwd": [n for n in DEFAULT_REGISTRY.names if n.startswith("xla")],
           "dgrad": [BASELINE, "xla_fp8_row"], "wgrad": [BASELINE, "xla_fp8_block", "pallas_fp8_row"]}
  for g in GEMMS:
    shape = GemmShape(g, 40, 72, 48, "float32")  # no dimension a multiple of 128
    lhs, rhs = shape.operands(jax.random.key(3))
    a, b = {"fwd": (lhs, rhs), "dgrad": (lhs, rhs.T), "wgrad": (lhs.T, rhs)}[g]
    for name in names[g]:
      c = DEFAULT_REGISTRY[name]
      y = c.build(shape, interpret=True)(lhs, rhs)
      want = jax.jit(CANDIDATES[c.choice.numerics].gemm(g))(a, b)
      assert y.shape == shape.reference(lhs, rhs).shape == want.shape
      # bf16: planned_dense's bf16 GEMM rounds its result to bf16 (2^-9 relative) before the cast
      assert float(mere(y, want)) < (2.0 ** -8 if name == BASELINE else 1e-6), (g, name)


def test_registry_register_and_select():
  make = DEFAULT_REGISTRY["pallas_fp8_row"].make_gemm
  reg = DEFAULT_REGISTRY.register(DispatchCandidate("pallas_fp8_row_v2", GemmChoice("fp8_row", "pallas"), make))
  assert reg.names[-1] == "pallas_fp8_row_v2" and "pallas_fp8_row_v2" not in DEFAULT_REGISTRY
  t = timings_for([SHAPE], {"pallas_fp8_row": 50.0, "pallas_fp8_row_v2": 40.0})
  assert choose_gemm("s", SHAPE, site_mere(0.04), t, registry=reg).candidate == "pallas_fp8_row_v2"
  with pytest.raises(ValueError, match="unique"):
    reg.register(reg["xla_bf16"])
  with pytest.raises(ValueError, match="baseline"):
    Registry((DEFAULT_REGISTRY["xla_fp8_row"],))
  assert DEFAULT_REGISTRY.select(["pallas_fp8_block"]).names == (BASELINE, "pallas_fp8_block")
  with pytest.raises(KeyError):
    DEFAULT_REGISTRY.select(["cublas_fp4"])


def test_cache_round_trip_and_key_separation(tmp_path):
  path = tmp_path / "dispatch.json"
  cache = TimingCache(path, jax_version="0.11.2")
  a, b = GemmShape("fwd", 64, 32, 16), GemmShape("dgrad", 64, 32, 16)
  cache.put("NVIDIA H100 80GB HBM3", a, "xla_bf16", 12.5)
  cache.put("NVIDIA H100 80GB HBM3", a, "pallas_fp8_block", None)
  cache.put("NVIDIA H200", a, "xla_bf16", 9.0)
  cache.save()
  back = TimingCache(path, jax_version="0.11.2")
  assert back.get("NVIDIA H100 80GB HBM3", a) == {"xla_bf16": 12.5, "pallas_fp8_block": None}
  assert back.get("NVIDIA H200", a) == {"xla_bf16": 9.0}
  assert back.get("NVIDIA H100 80GB HBM3", b) == {}  # other GEMM
  assert back.get("NVIDIA H100 80GB HBM3", GemmShape("fwd", 128, 32, 16)) == {}  # other M
  assert back.get("NVIDIA H100 80GB HBM3", GemmShape("fwd", 64, 32, 16, "float32")) == {}  # other dtype
  assert TimingCache(path, jax_version="0.12.0").get("NVIDIA H100 80GB HBM3", a) == {}  # other jax
  t = back.timings("NVIDIA H200", [a, b])
  assert (t.get(a, "xla_bf16"), t.get(b, "xla_bf16")) == (9.0, None)
  entry = json.loads(path.read_text())[back.key("NVIDIA H200", a)]
  assert (entry["device_kind"], entry["gemm"], entry["m"], entry["dtype"]) == ("NVIDIA H200", "fwd", 64, "bfloat16")


def test_corrupt_or_foreign_cache_is_measured_again(tmp_path):
  """A truncated, foreign or malformed cache file (a crash mid-write by an older version, a file of
  another tool) only loses its timings: it raised JSONDecodeError / AttributeError, or a cached 0
  timing divided by zero in the rule."""
  path = tmp_path / "dispatch.json"
  a = GemmShape("fwd", 64, 32, 16)
  good = TimingCache(path, jax_version="0.11.2")
  good.put("H100", a, BASELINE, 12.5)
  good.save()
  text = path.read_text()
  for bad in (text[: len(text) // 2], "[1, 2]", "\xff\xfe"):
    path.write_text(bad)
    with pytest.warns(UserWarning, match="dispatch timing cache"):
      assert TimingCache(path, jax_version="0.11.2").get("H100", a) == {}
  entries = json.loads(text)
  key = next(iter(entries))
  path.write_text(json.dumps({key: entries[key], "x": [], "y": {"us": None}, "z": {"us": {BASELINE: 0.0}}}))
  with pytest.warns(UserWarning, match="malformed entries"):
    back = TimingCache(path, jax_version="0.11.2")
  assert back.get("H100", a) == {BASELINE: 12.5} and set(back.entries) == {key}
  path.write_text("{")
  with pytest.warns(UserWarning, match="unreadable"):
    t = autotune([a], registry=DEFAULT_REGISTRY.select([]), cache_path=path, timer=CountingTimer(), device_kind="H100")
  assert t.get(a, BASELINE) > 0 and TimingCache(path).get("H100", a) == {BASELINE: t.get(a, BASELINE)}  # rewritten


def test_cache_saves_of_two_processes_keep_both(tmp_path):
  """Two autotunes sharing a cache (each read it when it started): the second save kept only its
  own timings, so the first one's were lost and measured again next time."""
  path = tmp_path / "dispatch.json"
  a, b = GemmShape("fwd", 64, 32, 16), GemmShape("fwd", 128, 32, 16)
  first, second = TimingCache(path), TimingCache(path)
  first.put("H100", a, BASELINE, 1.0)
  first.put("H100", b, "xla_fp8_row", 3.0)
  first.save()
  second.put("H100", b, BASELINE, 2.0)
  second.save()
  back = TimingCache(path)
  assert back.get("H100", a) == {BASELINE: 1.0}
  assert back.get("H100", b) == {BASELINE: 2.0, "xla_fp8_row": 3.0}


class CountingTimer:
  """A stand-in for CUPTI: a fixed time per candidate GEMM function, counting calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self, fn, args):
    self.calls += 1
    return 10.0 + self.calls


def test_autotune_caches_and_reuses(tmp_path):
  path = tmp_path / "dispatch.json"
  reg = DEFAULT_REGISTRY.select(["xla_fp8_row"])
  shapes = [GemmShape("fwd", 32, 48, 24, "float32")]
  timer = CountingTimer()
  first = autotune(shapes, registry=reg, cache_path=path, timer=timer, device_kind="H100 (test)")
  assert timer.calls == 2 and path.exists()
  assert set(first.us[shapes[0]]) == {BASELINE, "xla_fp8_row"} and first.device_kind == "H100 (test)"
  again = autotune(shapes, registry=reg, cache_path=path, timer=timer, device_kind="H100 (test)")
  assert timer.calls == 2 and again == first  # all from the cache
  other = autotune(shapes, registry=reg, cache_path=path, timer=timer, device_kind="H200 (test)")
  assert timer.calls == 4 and other.device_kind == "H200 (test)"  # another device kind is measured anew
  wider = reg.register(DEFAULT_REGISTRY["xla_fp8_tensor"])
  autotune(shapes, registry=wider, cache_path=path, timer=timer, device_kind="H100 (test)")
  assert timer.calls == 5  # only the new candidate


def test_autotune_without_gpu_is_not_timed(tmp_path):
  if on_gpu:
    pytest.skip("the CPU behaviour")
  path = tmp_path / "dispatch.json"
  assert autotune([SHAPE], cache_path=path) is None and not path.exists()


def test_negative_control_wrong_operand_fails_the_check(tmp_path):
  """A candidate whose forward reads the weight's columns shifted by one must be refused; the same
  check passes every correct candidate above."""
  wrong = DispatchCandidate("xla_fp8_row_wrong", GemmChoice("fp8_row", "xla"),
                            lambda g, dt, interp: lambda x, w: jnp.dot(x, jnp.roll(w, 1, axis=1)).astype(dt))
  reg = DEFAULT_REGISTRY.select([]).register(wrong)
  with pytest.raises(RuntimeError, match=r"xla_fp8_row_wrong.*MERE 1\.[0-9]"):  # ~sqrt(2)
    autotune([GemmShape("fwd", 32, 48, 24, "float32")], registry=reg, cache_path=None, timer=CountingTimer())


# --------------------------------------------------------------------------------------------
# Aggregate


def test_aggregate_plan_vs_global_recipes():
  sites = [("a", 256, 256), ("b", 512, 128)]
  sa = {s.gemm: s for s in site_shapes(sites[:1], batch=1024)}
  sb = {s.gemm: s for s in site_shapes(sites[1:], batch=1024)}
  # site a: row fast everywhere; site b: tensor fast, row slow
  us = {**{s: {BASELINE: 100.0, "xla_fp8_tensor": 90.0, "pallas_fp8_row": 50.0} for s in sa.values()},
        **{s: {BASELINE: 100.0, "xla_fp8_tensor": 60.0, "pallas_fp8_row": 120.0} for s in sb.values()}}
  t = Timings("synthetic H100", us)
  reg = DEFAULT_REGISTRY.select(["xla_fp8_tensor", "pallas_fp8_row"])
  m = {"a": site_mere(0.04), "b": site_mere({"fp8_tensor": 0.04, "fp8_row": 0.04, "fp8_block": 0.04})}
  plan, rows = make_plan(sites, m, batch=1024, timings=t, registry=reg)
  assert [r.candidate for r in rows] == ["pallas_fp8_row"] * 3 + ["xla_fp8_tensor"] * 3
  agg = aggregate(rows, t, mere=m, registry=reg)
  assert agg.baseline_us == 600.0 and agg.plan_us == 3 * 50.0 + 3 * 60.0
  assert agg.plan_speedup == pytest.approx(600 / 330)
  assert agg.global_us == {BASELINE: 600.0, "xla_fp8_tensor": 450.0, "pallas_fp8_row": 510.0}
  assert agg.best_global == "xla_fp8_tensor" and agg.global_speedup("xla_fp8_tensor") == pytest.approx(600 / 450)
  d = agg.as_dict()
  assert d["plan_vs_best_global"] == pytest.approx(450 / 330)
  assert d["best_global_within_bound"] == "xla_fp8_tensor"
  json.dumps(d)
  # a global recipe over the bound somewhere is still a global recipe, but not "within bound"
  m_bad = {"a": site_mere(0.04), "b": site_mere({"fp8_tensor": 0.3, "fp8_row": 0.04, "fp8_block": 0.04})}
  _, rows_bad = make_plan(sites, m_bad, batch=1024, timings=t, registry=reg)
  agg_bad = aggregate(rows_bad, t, mere=m_bad, registry=reg)
  assert agg_bad.best_global == "xla_fp8_tensor" and agg_bad.global_within_bound["xla_fp8_tensor"] is False
  assert agg_bad.best_global_within_bound == "pallas_fp8_row"
  assert agg_bad.plan_us == 3 * 50.0 + 3 * 100.0
  # "within bound" reads the upper end too: a mean under the bound with the upper end over it is not
  wide = MereEstimate.from_values([0.08, 0.09, 0.10, 0.11])
  assert wide.mean < DEFAULT_BOUND < wide.high
  m_wide = {"a": site_mere(0.04), "b": {**site_mere(0.04), "fp8_tensor": dict.fromkeys(GEMMS, wide)}}
  assert aggregate(rows, t, mere=m_wide, registry=reg).global_within_bound["xla_fp8_tensor"] is False
  assert aggregate(rows, t, mere=m, registry=reg).global_within_bound["xla_fp8_tensor"] is True
  # inference: forward GEMMs only
  fwd = aggregate(rows, t, gemms=("fwd",), registry=reg)
  assert (fwd.plan_us, fwd.baseline_us, fwd.global_within_bound[BASELINE]) == (110.0, 200.0, True)
  assert fwd.global_within_bound["pallas_fp8_row"] is None  # no MERE given
  with pytest.raises(ValueError, match="timings"):
    aggregate(rows, Timings("x", {}), registry=reg)


# --------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs an NVIDIA Hopper GPU (CUPTI timing of compiled kernels)")
def test_autotune_one_shape_on_gpu(tmp_path):
  sites = [("top.0", 512, 512)]
  shapes = site_shapes(sites, batch=4096)
  path = tmp_path / "dispatch.json"
  t = autotune(shapes, cache_path=path, iters=5)
  assert t.device_kind == jax.devices()[0].device_kind
  for s in shapes:
    assert all(t.get(s, n) is None or t.get(s, n) > 0 for n in DEFAULT_REGISTRY.names), t.us[s]
    assert t.get(s, BASELINE) > 0
  assert autotune(shapes, cache_path=path) == t  # reused from the cache
  m = {"top.0": mere_for_site(jax.random.key(0), Gaussian.standard(512), MatrixNormal.standard(512, 512),
                              candidates=("bf16", *FP8), num_samples=4, batch=256)}
  plan, rows = make_plan(sites, m, batch=4096, timings=t)
  assert all(r.speedup is not None for r in rows)
  agg = aggregate(rows, t, mere=m)
  assert agg.plan_us <= agg.global_us[BASELINE] * (1 + 1e-9)
  print(json.dumps([r.as_dict() for r in rows], indent=1), json.dumps(agg.as_dict(), indent=1))
