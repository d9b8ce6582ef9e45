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


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1e400"])
def test_non_finite_floats_are_refused_on_the_command_line(capsys, text):
  from train.ranker import Args
  with pytest.raises(SystemExit) as info:
    parse_config(Args, ["--optim.dense_lr", text], prog="p", description="")
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"--optim.dense_lr: expected float (a finite number), got {text!r}" in err


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
  (tmp_path / "r" / "checkpoints" / "5").mkdir(parents=True)  # a run that saved a checkpoint
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


def test_more_devices_or_an_uneven_batch_is_one_line_before_the_workdir_is_touched(tmp_path, capsys):
  from tests.serve.test_engine import SMOKE
  from train import ranker, user_model
  wd = tmp_path / "r"
  assert ranker.main(["--workdir", str(wd), *SMOKE, "--train.num_devices", "16"]) == 2
  assert "asked for 16 devices, 8 are available" in capsys.readouterr().err
  assert ranker.main(["--workdir", str(wd), *SMOKE, "--train.num_devices", "8", "--data.batch_size", "12"]) == 2
  assert "--data.batch_size=12 must be a multiple of the 8 devices" in capsys.readouterr().err
  assert not wd.exists()
  assert user_model.main(["--workdir", str(tmp_path / "u"), "--train.num_devices", "16", "--no-train.progress"]) == 2
  err = capsys.readouterr().err
  assert "asked for 16 devices" in err and "Traceback" not in err and not (tmp_path / "u").exists()


def test_a_pallas_plan_without_a_gpu_is_one_line(tmp_path, capsys):
  from tests.serve.test_engine import SMOKE
  from train import ranker
  assert ranker.main(["--workdir", str(tmp_path / "r"), *SMOKE, "--model.precision_plan", "uniform:fp8_row:pallas"]) == 2
  err = capsys.readouterr().err
  assert "runs the jaxrec Pallas kernels, which need a GPU (sm90); the backend here is 'cpu'" in err
  assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--model.kind", "logreg", "--model.precision_plan", "uniform:fp8_row"], "the logreg model has no GEMM sites"),
    (["--optim.adam_b1", "1.5"], "need optim.adam_b1 and optim.adam_b2 in [0, 1) and optim.adagrad_eps > 0"),
    (["--optim.adam_b2", "1"], "need optim.adam_b1 and optim.adam_b2 in [0, 1)"),
    (["--optim.adagrad_eps", "-1"], "optim.adagrad_eps > 0, got 0.9, 0.999 and -1.0"),
    (["--data.train", "adsworld:train@train"], "'train@train' is not an ads-world stream name"),
    (["--workdir", ""], "--workdir needs a non-empty value (default 'runs/ranker')"),
])
def test_ranker_settings_refused_before_training(argv, message, capsys, tmp_path):
  from train import ranker
  try:  # refused by the config parser (SystemExit) or by main's error report
    rc = ranker.main(["--workdir", str(tmp_path / "r"), *argv])
  except SystemExit as e:
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 2 and message in err and "Traceback" not in err and err.count("\n") == 1
  assert not (tmp_path / "r" / "checkpoints").exists()


def _config_refusal(main, argv: list[str], capsys) -> str:
  """The stderr of main(argv), which the config parser must refuse (SystemExit 2)."""
  with pytest.raises(SystemExit) as info:
    main(argv)
  assert info.value.code == 2
  return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data.train", "libfm:frappe/frappe.validation.libfm@train"], "data.train: 'libfm:frappe/"),
    (["--data.eval", "eval@eval"], "is not an ads-world stream name"),
])
def test_user_model_takes_ads_world_stream_names_only(argv, message, capsys):
  from train import user_model
  assert message in _config_refusal(user_model.main, argv, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--ranker.data.world.seed", "7"], "--ranker.data.world.seed is not an option here: the program sets it (set "
     "--world.* instead)"),
    (["--tower.data.world.num_users", "500"], "--tower.data.world.num_users is not an option here"),
    (["--ranker.model.seed", "9"], "--ranker.model.seed is not an option here: the program sets it (set --seeds"),
    (["--ranker.data.user_model", "/nowhere"], "--ranker.data.user_model is not an option here"),
    (["--tower.fresh"], "--tower.fresh is not an option here: the program sets it (set --fresh instead)"),
    (["--ranker.data.eval", "adsworld:train"], "--data.train and --data.eval are the same data"),
])
def test_sum_study_refuses_settings_it_would_override_or_fail_on_late(argv, message, capsys):
  from train import sum_study
  err = _config_refusal(sum_study.main, argv, capsys)
  assert message in err and err.count("\n") == 1


def test_sum_study_help_leaves_out_what_the_study_sets(capsys):
  from train import sum_study
  with pytest.raises(SystemExit):
    sum_study.main(["--help"])
  out = capsys.readouterr().out
  fields, fixed = out.split("set by the program, not options:")
  options = [line.split()[0] for line in fields.splitlines() if line.startswith("  --")]
  assert "--world.num_users" in options and "--ranker.train.steps" in options
  assert not [o for o in options if ".world." in o or o.endswith(".fresh") or o == "--ranker.model.seed"]
  assert "  --ranker.data.world.*  (set --world.* instead)" in fixed


def test_sum_study_checks_the_rankers_mesh_before_training_the_user_model(tmp_path, capsys):
  from train import sum_study
  assert sum_study.main(["--workdir", str(tmp_path / "s"), "--ranker.train.num_devices", "8",
                         "--ranker.data.batch_size", "100"]) == 2
  err = capsys.readouterr().err
  assert "--ranker.data.batch_size=100 must be a multiple of the 8 devices" in err
  assert not (tmp_path / "s").exists()


def test_an_unreadable_config_of_a_resumable_run_is_a_workdir_conflict(tmp_path):
  from jaxrec.training.loop import RankerConfig, WorkdirConflictError, prepare_workdir, unlock_workdir
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "config.json").write_text("{bad")
  try:
    with pytest.raises(WorkdirConflictError, match="config.json is unreadable .* pass --fresh to start over"):
      prepare_workdir(RankerConfig(), tmp_path)
    prepare_workdir(RankerConfig(fresh=True), tmp_path)  # --fresh starts over
  finally:
    unlock_workdir(tmp_path)  # prepare_workdir locks the workdir; the entrypoints release it
  assert json.loads((tmp_path / "config.json").read_text())["fresh"] is True


@pytest.mark.parametrize("argv, message", [
    (["--failover_ttl_s", "10"], "failover_ttl_s (10) must be >= the direct TTLs whose failover tier is replayed"),
    (["--stream", "eval@eval"], "stream: 'eval@eval' is not an ads-world stream name"),
])
def test_replay_refuses_what_the_server_would(argv, message, capsys):
  from serve import replay
  assert message in _config_refusal(replay.main, argv, capsys)


def test_a_workdir_another_run_is_using_is_refused_and_freed_when_it_ends(tmp_path, capsys):
  """Two runs in one workdir would interleave their checkpoints and metrics: the second is refused,
  naming the first's pid, until the first ends (however it ends: the OS drops the lock)."""
  import subprocess
  import sys

  from tests.serve.test_engine import SMOKE
  from train import ranker
  wd = tmp_path / "r"
  wd.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from pathlib import Path; from jaxrec.training.loop import lock_workdir; "
       "lock_workdir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)", str(wd)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    assert ranker.main(["--workdir", str(wd), *SMOKE]) == 2
    err = capsys.readouterr().err
    assert f"{wd} is in use by another run (pid {holder.pid}); wait for it to finish" in err
    assert not (wd / "checkpoints").exists() and not (wd / "config.json").exists()
  finally:
    holder.kill()
    holder.wait()
    holder.stdout.close()
  assert ranker.main(["--workdir", str(wd), *SMOKE]) == 0  # its lock died with it
  assert ranker.main(["--workdir", str(wd), *SMOKE, "--train.steps", "8"]) == 0  # and this process's own was released
