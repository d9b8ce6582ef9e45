"""PrecisionPlan files: another JSON file is refused, not read as an all-bf16 plan."""

import json

import pytest

from jaxrec.precision.plan import GemmChoice, PlanFileError, PrecisionPlan, SitePrecision


def test_a_json_file_without_a_plan_is_refused(tmp_path):
  """summary.json, bench_precision.json or {} given as --model.precision_plan loaded as a plan with
  no sites and the bf16 default: the run silently trained without the plan it was given."""
  for name, obj in (("summary.json", {"steps": 30, "eval_ne": 0.8}), ("bench_precision.json", {"variants": {}}),
                    ("empty.json", {}), ("typo.json", {"sites": {}, "defualt": {}})):
    (tmp_path / name).write_text(json.dumps(obj))
    with pytest.raises(PlanFileError, match="not a precision plan"):
      PrecisionPlan.load(tmp_path / name)
  plan = PrecisionPlan(sites={"top.layers.0": SitePrecision.uniform("fp8_row")})
  probe_output = {"plan": plan.to_json(), "sites": [{"site": "top.layers.0"}]}  # train.probe's precision_plan.json
  for obj in (plan.to_json(), probe_output, {"sites": plan.to_json()["sites"]}):
    (tmp_path / "p.json").write_text(json.dumps(obj))
    assert PrecisionPlan.load(tmp_path / "p.json") == plan
  (tmp_path / "d.json").write_text(json.dumps({"default": plan.to_json()["sites"]["top.layers.0"]}))
  assert PrecisionPlan.load(tmp_path / "d.json") == PrecisionPlan.uniform("fp8_row")


def test_fp8_delayed_covers_a_whole_site_with_one_impl():
  """The amax history covers the operands a site's three GEMMs share: a site delayed in only some
  GEMMs, or delayed with two impls, is refused."""
  delayed, row = GemmChoice("fp8_delayed"), GemmChoice("fp8_row")
  assert SitePrecision.uniform("fp8_delayed").is_delayed
  assert SitePrecision.uniform("fp8_delayed", "pallas").is_delayed
  for site in ((delayed, row, row), (row, delayed, delayed), (delayed, delayed, GemmChoice()),
               (delayed, GemmChoice("fp8_delayed", "pallas"), delayed)):
    with pytest.raises(ValueError, match="whole site"):
      SitePrecision(*site)
