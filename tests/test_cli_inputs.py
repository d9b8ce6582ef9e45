"""Command-line entrypoints: bad input is one clear error (no traceback), found before the long work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxrec.config import parse_config
from jaxrec.data.errors import DataSpecError
from jaxrec.models import DCNv2Config
from jaxrec.training.loop import drop_records_after
from jaxrec.training.step import OptimConfig


def test_nan_floats_are_refused_on_the_command_line(capsys):
  from train.ranker import Args
  with pytest.raises(SystemExit) as info:
    parse_config(Args, ["--optim.dense_lr", "nan"], prog="p", description="")
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "--optim.dense_lr: expected float (a number, not nan), got 'nan'" in err


@pytest.mark.parametrize("kw", [{"dense_lr": float("inf")}, {"embedding_lr": float("inf")},
                                {"dense_lr": float("nan")}])
def test_learning_rates_must_be_finite(kw):
  with pytest.raises(ValueError, match="must be finite"):
    OptimConfig(**kw)


@pytest.mark.parametrize("kw, message", [
    ({"top_mlp": ()}, "top_mlp needs at least one"),
    ({"embed_dim": 0}, "embed_dim must be >= 1"),
    ({"bottom_mlp": (0,)}, "widths must be >= 1"),
    ({"num_cross": -1}, "num_cross must be >= 0"),
    ({"cross_rank": -3}, "cross_rank >= 1"),
    ({"activation": "bogus"}, "activation must be one of"),
    ({"compute_dtype": "bogus"}, "compute_dtype must be float32 or bfloat16"),
    ({"combiner": "max"}, "combiner must be sum or mean"),
])
def test_dcnv2_config_checks_its_fields(kw, message):
  with pytest.raises(ValueError, match=message):
    DCNv2Config(**kw)


@pytest.mark.parametrize("text", ["", "[1, 2]", '{"model": "x"}', '{"bogus": {}}'])
def test_a_malformed_run_config_names_the_file(tmp_path, text):
  from jaxrec.training.restore import read_run_config
  (tmp_path / "config.json").write_text(text)
  with pytest.raises(ValueError, match="config.json"):
    read_run_config(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10])
def test_a_malformed_probe_stats_file_is_a_value_error(tmp_path, content):
  from jaxrec.precision.probe import ProbeState
  path = tmp_path / "probe_stats.npz"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="not a probe_stats.npz"):
    ProbeState.load(path)


def test_a_batch_larger_than_the_data_is_a_data_spec_error():
  from jaxrec.data.pipeline import ExamplesSource

  class Tiny:  # just what train_batch reads before it fails
    schema, source = None, "tiny.libfm"
    data = type("D", (), {"true_prob": None})()

    def __len__(self):
      return 10

  with pytest.raises(DataSpecError, match="larger than the 10 training examples of tiny.libfm"):
    ExamplesSource(Tiny(), seed=0).train_batch(0, 64)


def test_resuming_drops_the_records_logged_after_the_checkpoint(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "train/loss": 0.5}) + "\n" for s in (5, 10, 15, 20)) + '{"step": 2')
  drop_records_after(path, 10)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [5, 10]
  drop_records_after(tmp_path / "absent.jsonl", 3)  # nothing to do
  records = ({"step": 10, "train/loss": 0.5}, {"step": 10, "eval/click/ne": 0.9})
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  drop_records_after(path, 10, evals_at_step=True)  # a finished run evaluates its last step again
  assert [json.loads(l) for l in path.read_text().splitlines()] == [{"step": 10, "train/loss": 0.5}]


def test_mere_study_checks_its_output_directory_first(tmp_path, capsys):
  from train import mere_study
  assert mere_study.main(["--runs", str(tmp_path / "no_run"), "--out", "/proc/x"]) == 2
  assert "cannot use /proc/x as an output directory" in capsys.readouterr().err


def test_loadgen_checks_out_before_the_load(capsys):
  from serve import loadgen
  assert loadgen.main(["--url", "http://127.0.0.1:9", "--duration", "1", "--out", "/proc/x/report.json"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "cannot write --out /proc/x/report.json" in err


def test_bench_engine_refuses_nan_seconds():
  from serve.bench_engine import run
  with pytest.raises(ValueError, match="positive"):
    run(Path("unused"), 1, 1, float("nan"))


def test_an_ads_world_stream_too_short_for_the_run_is_refused_up_front():
  import dataclasses

  from jaxrec.data.adsworld.config import AdsWorldConfig
  from jaxrec.data.sources import DataConfig, _world, open_train_eval
  world = dataclasses.replace(AdsWorldConfig(), horizon_days=0.25)
  cfg = dataclasses.replace(DataConfig(), world=world, eval_batch_size=256, eval_examples=512)
  held = _world(world).num_examples("train")
  with pytest.raises(DataSpecError, match=r"--train.steps x --data.batch_size reads .* raise --data.world.horizon_days"):
    open_train_eval(cfg, held + 1)
  train, evl = open_train_eval(cfg, held // 2)  # fits: both streams open
  assert evl.eval_examples_read(256) <= _world(world).num_examples("eval")
  next(evl.eval_batches(256))


def test_ctrl_c_is_one_line_with_how_to_resume(monkeypatch, tmp_path, capsys):
  from train import ranker

  def interrupted(cfg, workdir):
    raise KeyboardInterrupt

  monkeypatch.setattr(ranker, "train_and_evaluate", interrupted)
  assert ranker.main(["--workdir", str(tmp_path / "r")]) == 130
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "run the same command again to resume" in err


@pytest.mark.parametrize("value", ["-1", "1e9"])
def test_serve_drain_timeout_is_checked(value, capsys):
  from serve.__main__ import main
  with pytest.raises(SystemExit) as info:
    main(["--drain_timeout_s", value])
  assert info.value.code == 2
  assert "drain_timeout_s must be in [0, 86400]" in capsys.readouterr().err


def test_a_diverging_run_stops_before_saving_nan_parameters(tmp_path, capsys):
  from tests.serve.test_engine import SMOKE
  from train import ranker
  wd = tmp_path / "r"
  args = ["--workdir", str(wd), *SMOKE, "--train.log_every", "2", "--train.checkpoint_every", "2",
          "--optim.dense_lr", "1e30", "--optim.embedding_lr", "1e30"]
  assert ranker.main(args) == 2
  err = capsys.readouterr().err
  assert "training diverged" in err and "Traceback" not in err
  assert not (wd / "summary.json").exists()
  saved = sorted(p.name for p in (wd / "checkpoints").iterdir()) if (wd / "checkpoints").exists() else []
  assert saved == [], f"checkpoints of NaN parameters were saved: {saved}"


@pytest.mark.parametrize("kw, message", [
    ({"mix_mlp": ()}, "mix_mlp needs at least one"),
    ({"user_mlp": (0,)}, "widths must be >= 1"),
    ({"mix_cross": -2}, "mix_cross must be >= 0"),
    ({"activation": "bogus"}, "activation must be one of"),
])
def test_user_tower_config_checks_its_fields(kw, message):
  from jaxrec.models.user_tower import UserTowerConfig
  with pytest.raises(ValueError, match=message):
    UserTowerConfig(**kw)


def test_user_tower_feature_not_in_the_data_is_a_data_spec_error():
  from jaxrec.models.user_tower import _indices
  with pytest.raises(DataSpecError, match=r"sparse feature\(s\) \['bogus'\] are not in the data's schema"):
    _indices(("user_id", "bogus"), ("user_id", "ad_id"), "sparse")


def test_user_model_refuses_a_stream_too_short_for_the_run(tmp_path, capsys):
  from train import user_model
  rc = user_model.main(["--workdir", str(tmp_path / "u"), "--data.world.horizon_days", "0.5",
                        "--data.world.drift_knot_s", "3600", "--no-train.progress"])
  err = capsys.readouterr().err
  assert rc == 2 and "raise --data.world.horizon_days" in err and "Traceback" not in err
  assert not (tmp_path / "u" / "checkpoints").exists()
