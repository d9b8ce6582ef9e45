"""Argument and run-directory checks of train.probe, train.mere_study, train.bench_precision and
train.fp8_study: refused up front, in one line, before any training, sampling or timing.

The runs here are fakes (config.json, schema.json, probe_stats.npz and an empty checkpoint folder):
the checks read no data and restore nothing, and a test that got past them would fail on the fake.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrec.config import config_to_dict
from jaxrec.data.batch import Schema, SparseFeature, batch_from_numpy
from jaxrec.data.pipeline import pad_batch
from jaxrec.data.sources import DataConfig
from jaxrec.layers.dense import capture_gemm_operands, gemm_sites
from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.precision.plan import PlanError, PrecisionPlan, SitePrecision
from jaxrec.precision.probe import ProbeState
from jaxrec.training.loop import RankerConfig
from train import bench_precision, fp8_study, mere_study, probe

SCHEMA = Schema(dense=("a", "b"), sparse=(SparseFeature("u", 20), SparseFeature("q", None, 2)), labels=("click",))
TINY = DCNv2Config(embed_dim=4, bottom_mlp=(8,), num_cross=1, top_mlp=(8,))


def _sites(model_cfg=ModelConfig(dcnv2=TINY)):
  return gemm_sites(nnx.eval_shape(lambda: build_model(SCHEMA, model_cfg)))


def fake_run(path, kind="dcnv2"):
  """A run directory with what the checks look at; its checkpoint folder is empty (restoring fails)."""
  path.mkdir()
  model = ModelConfig(kind=kind, dcnv2=TINY)
  cfg = RankerConfig(data=DataConfig(batch_size=64, eval_examples=256), model=model)
  (path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
  (path / "schema.json").write_text(json.dumps(SCHEMA.to_json()))
  sites = _sites(model) if kind == "dcnv2" else []
  ProbeState.init(sites).replace(updates=jnp.ones((), jnp.int32)).save(path / "probe_stats.npz")
  (path / "checkpoints" / "3").mkdir(parents=True)
  return path


def _one_line_error(capsys, *needles):
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "error:" in err, err
  for n in needles:
    assert n in err, err


# train.mere_study


def test_mere_study_refuses_an_empty_metrics_list(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    mere_study.main(["--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--metrics", ""])
  assert e.value.code == 2
  _one_line_error(capsys, "--metrics")


def test_mere_study_refuses_a_logreg_run(tmp_path, capsys):
  run = fake_run(tmp_path / "lr", kind="logreg")
  assert mere_study.main(["--runs", str(run), "--out", str(tmp_path / "o")]) == 2
  _one_line_error(capsys, "logreg", "no GEMM sites")


def test_mere_study_checks_every_run_before_working_on_the_first(tmp_path, capsys, monkeypatch):
  studied = []
  monkeypatch.setattr(mere_study, "study_run", lambda args, run_dir, *rest: studied.append(run_dir))
  runs = f"{fake_run(tmp_path / 'a')},{tmp_path / 'nonexistent'}"
  assert mere_study.main(["--runs", runs, "--out", str(tmp_path / "o")]) == 2
  _one_line_error(capsys, "nonexistent", "no such directory")
  assert studied == []


def test_check_run_names_what_a_run_lacks(tmp_path):
  run = fake_run(tmp_path / "a")
  assert set(probe.check_run(run).acts) == {s for s, _, _ in _sites()}
  (run / "checkpoints" / "3").rmdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    probe.check_run(run)
  other = fake_run(tmp_path / "b")
  ProbeState.init(_sites()[:1]).replace(updates=jnp.ones((), jnp.int32)).save(other / "probe_stats.npz")
  with pytest.raises(ValueError, match="lacks GEMM sites"):
    probe.check_run(other)


# train.probe


def test_probe_refuses_a_logreg_model_before_training(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    probe.main(["--workdir", str(tmp_path / "w"), "--model.kind", "logreg"])
  assert e.value.code == 2
  _one_line_error(capsys, "no GEMM sites to probe", "--model.kind dcnv2")
  assert not (tmp_path / "w").exists()


def test_probe_from_run_refuses_a_logreg_run_and_a_missing_directory(tmp_path, capsys):
  run = fake_run(tmp_path / "lr", kind="logreg")
  assert probe.main(["--workdir", str(tmp_path / "w"), "--from_run", str(run)]) == 2
  _one_line_error(capsys, "logreg", "no GEMM sites to probe")
  assert probe.main(["--workdir", str(tmp_path / "w2"), "--from_run", str(tmp_path / "nope")]) == 2
  _one_line_error(capsys, "nope: no such directory")


class _EvalSource:
  """Eval batches of `rows` real rows each, the last one ragged and zero-padded (weight 0) as
  ExamplesSource pads it."""

  def __init__(self, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sparse = np.stack([rng.integers(0, f.vocab_size or 10**6, (n, SCHEMA.max_len)) for f in SCHEMA.sparse], 1)
    self.batch = batch_from_numpy(dense=rng.normal(size=(n, SCHEMA.num_dense)) + 3.0, sparse=sparse,
                                  sparse_mask=np.ones(sparse.shape, bool),
                                  labels=rng.integers(0, 2, (n, SCHEMA.num_tasks)), weights=np.ones(n),
                                  domain=np.zeros(n), timestamp=np.zeros(n))
    self.n = n

  def rows(self, start: int, stop: int):
    return jax.tree.map(lambda v: v[start:stop], self.batch)

  def eval_batches(self, batch_size: int):
    for start in range(0, self.n, batch_size):
      yield pad_batch(self.rows(start, min(start + batch_size, self.n)), batch_size)


def test_real_operands_leave_out_padding_rows_and_say_when_there_are_too_few():
  """10 real rows in eval batches of 8 (the second one 2 real rows + 6 of padding) for 3 samples of
  8 rows: the padding rows entered the real operands (2 samples of 8 rows, 6 of them zero padding)."""
  model = build_model(SCHEMA, ModelConfig(dcnv2=TINY))
  src = _EvalSource(10)
  op = probe.real_operands(model, src, rows=8, samples=3)
  _, acts, _ = capture_gemm_operands(model, lambda m: m(src.batch).sum())  # the 10 real rows in one batch
  for s, x in acts.items():
    assert op.xs[s].shape == (2, 5, x.shape[1]) and op.dys[s].shape[:2] == (2, 5)
    np.testing.assert_allclose(np.asarray(op.xs[s]).reshape(10, -1), np.asarray(x), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(op.dys[s])).all() and np.abs(np.asarray(op.dys[s])).sum(-1).min() > 0
  assert op.eval_rows == 10 and "10 real rows" in op.note and "2 samples of 5 rows" in op.note
  # enough real rows for 2 full samples of 8: fewer samples, all of 8 rows
  op = probe.real_operands(model, _EvalSource(20), rows=8, samples=3)
  assert next(iter(op.xs.values())).shape[:2] == (2, 8) and "2 samples of 8 rows" in op.note
  op = probe.real_operands(model, _EvalSource(24), rows=8, samples=3)
  assert next(iter(op.xs.values())).shape[:2] == (3, 8) and op.note == ""
  with pytest.raises(ValueError, match="3 real rows"):
    probe.real_operands(model, _EvalSource(3), rows=8, samples=3)


# train.bench_precision


def test_bench_precision_refuses_a_plan_no_variant_uses(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    bench_precision.main(["--run", str(tmp_path), "--variants", "bf16", "--plan", str(tmp_path / "no.json"),
                          "--out", str(tmp_path / "o")])
  assert e.value.code == 2
  _one_line_error(capsys, "--plan", "'plan' variant")


def test_bench_precision_checks_plans_before_timing():
  sites = _sites()
  plans = {"bf16": None, "fp8_row:xla": PrecisionPlan.uniform("fp8_row")}
  bench_precision.check_plans(plans, sites, "cpu")
  with pytest.raises(PlanError, match="need a GPU"):
    bench_precision.check_plans({**plans, "fp8_row:pallas": PrecisionPlan.uniform("fp8_row", "pallas")}, sites, "cpu")
  bench_precision.check_plans({"fp8_row:pallas": PrecisionPlan.uniform("fp8_row", "pallas")}, sites, "gpu")
  foreign = PrecisionPlan(sites={"no.such.site": SitePrecision.uniform("fp8_row")})
  with pytest.raises(PlanError, match="variant plan: .*no.such.site"):
    bench_precision.check_plans({"bf16": None, "plan": foreign}, sites, "gpu")


def test_bench_precision_refuses_pallas_on_cpu_before_timing(tmp_path, capsys, monkeypatch):
  timed = []
  monkeypatch.setattr(bench_precision, "_median_step_s", lambda *a: timed.append(a) or 1.0)
  monkeypatch.setattr(bench_precision.jax, "default_backend", lambda: "cpu")
  run = fake_run(tmp_path / "a")
  assert bench_precision.main(["--run", str(run), "--variants", "bf16,fp8_row", "--impls", "pallas",
                               "--out", str(tmp_path / "o")]) == 2
  _one_line_error(capsys, "fp8_row:pallas", "need a GPU")
  assert timed == []


# train.fp8_study


def test_fp8_study_validates_its_recipe_when_the_config_is_made(capsys):
  assert fp8_study.Args(fp8="fp8_row:pallas").fp8 == "fp8_row:pallas"
  for bad in ("fp8_foo", "fp8_row:cuda", "bf16", "fp8_row:pallas:x"):
    with pytest.raises(ValueError, match="--fp8"):
      fp8_study.Args(fp8=bad)


def test_fp8_study_refuses_pallas_on_cpu_before_training(tmp_path, capsys, monkeypatch):
  trained = []
  monkeypatch.setattr(fp8_study, "train_and_evaluate", lambda cfg, wd: trained.append(wd))
  monkeypatch.setattr(probe, "run", lambda args: trained.append(args))
  monkeypatch.setattr(fp8_study.jax, "default_backend", lambda: "cpu")
  assert fp8_study.main(["--workdir", str(tmp_path / "s"), "--fp8", "fp8_row:pallas"]) == 2
  _one_line_error(capsys, "--fp8 fp8_row:pallas", "need a GPU")
  assert trained == []
  plan = tmp_path / "plan.json"
  PrecisionPlan.uniform("fp8_block", "pallas").save(plan)
  assert fp8_study.main(["--workdir", str(tmp_path / "s2"), "--plan", str(plan)]) == 2
  _one_line_error(capsys, f"--plan {plan}", "need a GPU")
  assert trained == []
  with pytest.raises(ValueError, match="need a GPU"):
    fp8_study.check_plans(fp8_study.Args(fp8="fp8_tensor:pallas"), "cpu")
  fp8_study.check_plans(fp8_study.Args(fp8="fp8_tensor:pallas"), "gpu")
