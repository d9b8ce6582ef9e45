"""python -m train.probe end to end on a tiny ads-world run, and the Probe inside the training loop."""

import json

import numpy as np
import pytest

from jaxrec.layers.dense import gemm_sites
from jaxrec.precision.plan import PrecisionPlan
from jaxrec.precision.probe import ProbeState
from train import probe

TINY = ["--train.steps", "30", "--train.log_every", "10", "--train.checkpoint_every", "30", "--probe.every", "10",
        "--data.batch_size", "256", "--data.eval_examples", "512", "--samples", "2", "--rows", "64",
        "--train.num_devices", "1"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
  wd = tmp_path_factory.mktemp("probe")
  assert probe.main(["--workdir", str(wd)] + TINY) == 0
  return wd


def test_outputs_and_plan(probed):
  out = json.loads((probed / "precision_plan.json").read_text())
  for name in ("report.md", "mere_heatmap.png", "mere_heatmap_real.png", "probe_stats.npz", "summary.json"):
    assert (probed / name).exists(), name
  _, model, _ = probe.load_run(probed)
  sites = gemm_sites(model)
  plan = PrecisionPlan.from_json(out["plan"])
  plan.check_sites(sites)
  assert plan.shapes == {name: (k, n) for name, k, n in sites}
  assert len(out["rows"]) == 3 * len(sites) and not out["timed"]
  assert all(r["speedup"] == "not timed" for r in out["rows"])
  for s, _, _ in sites:
    assert set(out["mere"][s]) == {"learned", "standard", "real"}
    for setting in out["mere"][s].values():
      assert setting["bf16"]["fwd"]["mean"] < setting["fp8_tensor"]["fwd"]["mean"]  # fp8 is coarser than bf16
  p = out["probe"]
  assert p["probe_updates"] == 3 and p["probe_every"] == 10
  report = (probed / "report.md").read_text()
  assert "not timed" in report and sites[0][0] in report and "(wgrad GEMM)" in report
  # every table renders: each row has its header's cells (a bare | inside a cell split it, and the
  # three MERE tables did not render as tables)
  tables = [t.splitlines() for t in report.split("\n\n") if t.startswith("|")]
  assert len(tables) == 4
  for rows in tables:
    cells = [len(r.strip("|").split("|")) for r in rows]
    assert len(set(cells)) == 1 and rows[1].startswith("|---"), rows[:3]


def test_probe_stats_cover_every_site_and_match_activation_counts(probed):
  stats = ProbeState.load(probed / "probe_stats.npz")
  _, model, _ = probe.load_run(probed)
  names = {s for s, _, _ in gemm_sites(model)}
  assert set(stats.acts) == set(stats.grads) == names
  for w in list(stats.acts.values()) + list(stats.grads.values()):
    assert float(w.count) == 3 * 256  # 3 probes, max_rows (512) > batch rows (256)
    assert np.isfinite(np.asarray(w.m2)).all()
  for s in names:  # output gradients of a mean loss over 256 rows: small, but not zero
    assert 0 < float(np.trace(np.asarray(stats.grads[s].covariance()))) < 1


def test_from_run_reuses_a_run_and_plans_deterministically(probed, tmp_path):
  args = ["--from_run", str(probed), "--samples", "2", "--rows", "64"]
  assert probe.main(["--workdir", str(tmp_path / "a")] + args) == 0
  assert probe.main(["--workdir", str(tmp_path / "b")] + args) == 0
  a = json.loads((tmp_path / "a" / "precision_plan.json").read_text())
  b = json.loads((tmp_path / "b" / "precision_plan.json").read_text())
  assert a["plan"] == b["plan"] and a["mere"] == b["mere"]


def test_missing_statistics_are_a_clear_error(tmp_path, capsys):
  assert probe.main(["--workdir", str(tmp_path / "x"), "--from_run", str(tmp_path / "nope")]) == 2
  assert "no probe_stats.npz" in capsys.readouterr().err


def test_statistics_without_a_probe_update_are_refused(tmp_path, capsys):
  """A run killed (or ended) before its first probe step leaves empty statistics: their operands
  are all zero, every candidate's MERE read 0 and the plan took FP8 for every GEMM."""
  from train import mere_study
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  ProbeState.init([("top.layers.0", 8, 4)]).save(run_dir / "probe_stats.npz")
  assert probe.main(["--workdir", str(tmp_path / "w"), "--from_run", str(run_dir)]) == 2
  assert "holds no Probe update" in capsys.readouterr().err
  assert mere_study.main(["--runs", str(run_dir), "--out", str(tmp_path / "o")]) == 2
  assert "holds no Probe update" in capsys.readouterr().err


def test_probe_off_is_refused(tmp_path, capsys):
  assert probe.main(["--workdir", str(tmp_path / "y"), "--probe.every", "0"]) == 2
  assert "--probe.every" in capsys.readouterr().err


def test_fp8_study_runs_the_four_models_with_the_plan(probed, tmp_path):
  from train import fp8_study
  wd = tmp_path / "study"
  args = ["--workdir", str(wd), "--plan", str(probed / "precision_plan.json"), "--train.steps", "8",
          "--train.log_every", "4", "--train.checkpoint_every", "8", "--data.batch_size", "128",
          "--data.eval_examples", "512", "--train.num_devices", "1"]
  assert fp8_study.main(args) == 0
  out = json.loads((wd / "fp8_study.json").read_text())
  r = out["results"]
  assert set(r) == {"baseline", "baseline_fp8", "mods", "mods_plan"}
  assert all(v["steps"] == 8 for v in r.values())
  assert r["baseline_fp8"]["eval_ne"] != r["baseline"]["eval_ne"]  # FP8 numerics really ran
  cfg = json.loads((wd / "mods_plan" / "config.json").read_text())
  assert cfg["model"]["precision_plan"] == str(probed / "precision_plan.json")
  assert "| mods_plan |" in (wd / "fp8_study.md").read_text()
  # run again (as after an interruption): the finished runs time no steps, so their throughput is unknown
  assert fp8_study.main(args) == 0
  assert all(v["examples_per_sec"] is None for v in json.loads((wd / "fp8_study.json").read_text())["results"].values())
  assert "| mods_plan |" in (wd / "fp8_study.md").read_text()


def test_fp8_study_probes_the_studys_data_and_seed(tmp_path, monkeypatch, capsys):
  """Without --plan the probe run got only --data.batch_size: it trained on the default data (not
  --data.train / --data.world ...), optimizer and seed, so the plan came from another model."""
  from train import fp8_study
  seen = []

  def fake_run(args):
    seen.append(args)
    raise ValueError("stop here")

  monkeypatch.setattr(probe, "run", fake_run)
  assert fp8_study.main(["--workdir", str(tmp_path / "s"), "--data.batch_size", "128", "--data.eval_examples", "512",
                         "--data.world.seed", "7", "--optim.dense_lr", "0.003", "--seed", "5"]) == 2
  (args,) = seen
  assert (args.data.batch_size, args.data.eval_examples, args.data.world.seed) == (128, 512, 7)
  assert args.optim.dense_lr == 0.003 and args.model.seed == 5 and args.model.dcnv2 == probe.MODS
  assert args.workdir == str(tmp_path / "s" / "probe") and "stop here" in capsys.readouterr().err


def test_fp8_study_bad_numerics(tmp_path, capsys):
  from train import fp8_study
  with pytest.raises(SystemExit):
    fp8_study.main(["--workdir", str(tmp_path), "--fp8", "bf16"])


def test_mere_study_scores_claim_one_under_every_metric(probed, tmp_path):
  from train import mere_study
  out = tmp_path / "ms"
  assert mere_study.main(["--runs", str(probed), "--out", str(out), "--samples", "2", "--rows", "64",
                          "--candidates", "bf16,fp8_tensor", "--gemms", "fwd,wgrad",
                          "--metrics", "elementwise_mean,elementwise_median"]) == 0  # "mere": test_outputs_and_plan
  res = json.loads((out / "mere_study.json").read_text())["runs"][str(probed)]
  assert res["dy_probed"] is True
  res = res["metrics"]
  assert set(res) == {"elementwise_mean", "elementwise_median"}
  _, model, _ = probe.load_run(probed)
  n_sites = len(gemm_sites(model))
  for metric, by_gemm in res.items():
    assert set(by_gemm) == {"fwd", "wgrad"}
    for v in by_gemm.values():
      assert len(v["table"]) == 2 * n_sites and v["summary"]["pairs"] == 2 * n_sites
      for row in v["table"]:
        assert all(row[k] > 0 for k in ("learned", "standard", "real")), (metric, row)
  # the median form is never above the mean form on the same operands
  for a, b in zip(res["elementwise_median"]["fwd"]["table"], res["elementwise_mean"]["fwd"]["table"]):
    assert a["standard"] <= b["standard"] + 1e-6
  md = (out / "mere_study.md").read_text()
  assert f"| {probed} | elementwise_mean | fwd |" in md and f"| {probed} | elementwise_median | wgrad |" in md
  assert "| real > N(0,1) | both |" in md


def test_mere_study_summary_counts():
  from train import mere_study
  table = [{"learned": 2.0, "standard": 1.0, "real": 3.0},   # both above, learned closer
           {"learned": 2.0, "standard": 1.0, "real": 0.5},   # learned above only, N(0,1) closer
           {"learned": 0.5, "standard": 1.0, "real": 2.0},   # real above only
           {"learned": 0.5, "standard": 1.0, "real": 0.4}]   # neither, learned closer
  s = mere_study.summarise(table)
  assert (s["pairs"], s["learned_above_standard"], s["real_above_standard"], s["both_above_standard"],
          s["learned_closer_to_real"]) == (4, 2, 2, 1, 2)
  assert s["geo_learned_over_standard"] == pytest.approx(1.0) and s["geo_real_over_standard"] == pytest.approx(
      (3.0 * 0.5 * 2.0 * 0.4) ** 0.25)


def test_mere_study_summary_with_the_f32_candidate():
  """--candidates f32,...: the reference itself has MERE 0 on N(0, 1), which divided by zero; it is no
  pair of the study, so the counts' denominator ("of pairs") leaves it out too (it counted it)."""
  from train import mere_study
  s = mere_study.summarise([{"learned": 0.0, "standard": 0.0, "real": 0.0},
                            {"learned": 2.0, "standard": 1.0, "real": 4.0}])
  assert (s["pairs"], s["learned_above_standard"], s["learned_closer_to_real"]) == (1, 1, 1)
  assert s["geo_learned_over_standard"] == pytest.approx(2.0) and s["geo_real_over_standard"] == pytest.approx(4.0)


def test_mere_study_needs_runs_and_known_metrics(tmp_path, capsys):
  from train import mere_study
  with pytest.raises(SystemExit):
    mere_study.main([])
  assert "--runs" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mere_study.main(["--runs", str(tmp_path), "--metrics", "nope"])
  assert "unknown metric" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    mere_study.main(["--runs", str(tmp_path), "--gemms", "bwd"])
  assert "--gemms" in capsys.readouterr().err
  assert mere_study.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
  assert "probe_stats.npz" in capsys.readouterr().err
  for bad, says in ((["--samples", "0"], "--samples and --rows"), (["--candidates", "fp9"], "unknown candidate")):
    with pytest.raises(SystemExit):
      mere_study.main(["--runs", str(tmp_path)] + bad)
    assert says in capsys.readouterr().err


def test_probe_refuses_bad_options_before_training(tmp_path, capsys):
  for bad, says in ((["--bound", "-1"], "--bound must be > 0"), (["--candidates", "foo"], "unknown candidate"),
                    (["--candidates", "bf16,bf16"], "must be unique"), (["--plan_batch", "-2"], "--plan_batch")):
    with pytest.raises(SystemExit):
      probe.main(["--workdir", str(tmp_path / "p")] + bad)
    assert says in capsys.readouterr().err
  assert not (tmp_path / "p").exists()
  # --from_run probes the run as trained: training options were accepted and silently ignored
  for bad in (["--data.eval_examples", "1000"], ["--probe.every", "5"], ["--fresh"]):
    with pytest.raises(SystemExit):
      probe.main(["--workdir", str(tmp_path / "p"), "--from_run", str(tmp_path)] + bad)
    assert "--from_run probes the run as it was trained: --" + bad[0].split(".")[0][2:] in capsys.readouterr().err
  assert not (tmp_path / "p").exists()


def test_bench_precision_times_each_variant_and_checks_outputs(probed, tmp_path, capsys):
  from train import bench_precision
  out_dir = tmp_path / "bench"
  assert bench_precision.main(["--run", str(probed), "--out", str(out_dir), "--batch", "256", "--steps", "1",
                               "--repeats", "1", "--variants", "bf16,plan,fp8_delayed"]) == 0
  out = json.loads((out_dir / "bench_precision.json").read_text())
  assert list(out["variants"]) == ["bf16", "plan", "fp8_delayed:xla"]
  plan = PrecisionPlan.load(probed / "precision_plan.json")
  n_sites = len(out["sites"])
  fwd_fp8 = sum(plan.site(s["site"]).fwd.is_fp8 for s in out["sites"])
  for name, r in out["variants"].items():
    for phase in ("train", "infer", "serve"):
      assert r[f"{phase}_ms"] > 0 and np.isfinite(r[f"{phase}_speedup"])
    if name == "bf16":
      assert r["max_abs_dp"] == 0.0 and r["prequantized_sites"] == 0
    else:  # really quantized, and still the same model's predictions
      assert 0.0 < r["max_abs_dp"] < 0.1 and abs(r["logloss_change_vs_bf16"]) < 0.01
      assert sum(r["gemms"].values()) == 3 * n_sites
  assert out["variants"]["plan"]["prequantized_sites"] == fwd_fp8 > 0
  assert out["variants"]["fp8_delayed:xla"]["prequantized_sites"] == 0  # scales come from its histories
  assert set(out["plan_vs_best_global"]) == {"train", "infer", "serve"}
  printed = capsys.readouterr().out
  assert "| plan |" in printed and "not FP8 speeds" in printed
  assert (out_dir / "bench_precision.md").exists()


def test_bench_precision_without_a_run_is_a_clear_error(tmp_path, capsys):
  from train import bench_precision
  assert bench_precision.main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
  assert "train.probe" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:  # the config parser's usage error
    bench_precision.main(["--variants", "bf16,fp9"])
  assert e.value.code == 2 and "unknown --variants" in capsys.readouterr().err
