"""python -m train.ranker: runs, writes its outputs, restores, and resumes exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import ranker

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["--data.batch_size", "128", "--data.eval_batch_size", "256", "--data.eval_examples", "1024",
         "--model.dcnv2.embed_dim", "8", "--model.dcnv2.top_mlp", "32,16", "--train.log_every", "5",
         "--no-train.progress", "--train.num_devices", "1"]


def final_params(workdir: Path, step: int) -> dict:
  return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "default").absolute())


def assert_trees_equal(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def _leaves(tree, prefix=""):
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_leaves(v, f"{prefix}/{k}"))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      out.update(_leaves(v, f"{prefix}/{i}"))
  elif tree is not None:
    out[prefix] = np.asarray(tree)
  return out


def test_smoke_run_writes_outputs(tmp_path, capsys):
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd), "--train.steps", "12", "--train.checkpoint_every", "6"] + SMOKE) == 0
  out = capsys.readouterr().out
  assert "eval_ne=" in out
  summary = json.loads((wd / "summary.json").read_text())
  for k in ("eval_ne", "eval_auc", "steps", "examples_per_sec", "oracle_ne"):
    assert k in summary, k
  assert summary["steps"] == 12 and np.isfinite(summary["eval_ne"]) and summary["examples_per_sec"] > 0
  lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert any("train/loss" in l and np.isfinite(l["train/loss"]) for l in lines)
  assert any("eval/click/ne" in l for l in lines)
  assert (wd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]
  restored = final_params(wd, 12)
  assert int(restored["step"]) == 12
  assert np.all(np.isfinite(restored["table"]))


def test_resume_is_bitwise_exact_in_process(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  common = ["--train.checkpoint_every", "5"] + SMOKE
  assert ranker.main(["--workdir", str(a), "--train.steps", "10"] + common) == 0
  assert ranker.main(["--workdir", str(b), "--train.steps", "5"] + common) == 0
  assert ranker.main(["--workdir", str(b), "--train.steps", "10"] + common) == 0
  assert_trees_equal(final_params(a, 10), final_params(b, 10))
  # negative control: a different seed gives different parameters
  c = tmp_path / "c"
  assert ranker.main(["--workdir", str(c), "--train.steps", "10", "--model.seed", "1"] + common) == 0
  with pytest.raises(AssertionError):
    assert_trees_equal(final_params(a, 10), final_params(c, 10))


def test_a_resume_with_more_steps_evaluates_the_same_rows(tmp_path, capsys):
  """An ads-world eval is spread over the training period (steps x batch size); a run resumed with
  more --train.steps keeps its first start's period, so every eval record of its metrics.jsonl
  is over the same rows (the oracle NE depends on the rows alone) and the curve stays one curve."""
  wd = tmp_path / "run"
  common = ["--workdir", str(wd), "--train.eval_every", "4", "--train.checkpoint_every", "4"] + SMOKE
  assert ranker.main(common + ["--train.steps", "8"]) == 0
  assert "note: evaluating on the rows" not in capsys.readouterr().err
  assert ranker.main(common + ["--train.steps", "16"]) == 0
  assert "note: evaluating on the rows this run evaluated before" in capsys.readouterr().err
  evals = [r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines()) if "eval/click/ne" in r]
  assert [r["step"] for r in evals] == [4, 8, 12, 16]
  assert len({r["eval/click/oracle_ne"] for r in evals}) == 1, evals
  # negative control: a run started with 16 steps spreads its eval over 16 steps' examples: other rows
  other = tmp_path / "other"
  assert ranker.main(["--workdir", str(other), "--train.steps", "16"] + SMOKE) == 0
  assert json.loads((other / "summary.json").read_text())["oracle_ne"] != evals[-1]["eval/click/oracle_ne"]
  # --fresh starts the period over
  assert ranker.main(common + ["--train.steps", "16", "--fresh"]) == 0
  assert json.loads((wd / "eval_span.json").read_text()) == {"examples": 16 * 128}


def test_resume_refuses_a_different_config(tmp_path, capsys):
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd), "--train.steps", "3"] + SMOKE) == 0
  assert ranker.main(["--workdir", str(wd), "--train.steps", "6", "--model.kind", "logreg"] + SMOKE) == 2
  assert "different 'model' config" in capsys.readouterr().err
  assert ranker.main(["--workdir", str(wd), "--train.steps", "6", "--model.kind", "logreg", "--fresh"] + SMOKE) == 0


def test_fewer_steps_than_the_workdir_holds_is_refused(tmp_path, capsys):
  """It used to train nothing and report the later checkpoint's step as the run asked for."""
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd), "--train.steps", "4"] + SMOKE) == 0
  capsys.readouterr()
  config = (wd / "config.json").read_text()
  assert ranker.main(["--workdir", str(wd), "--train.steps", "2"] + SMOKE) == 2
  err = capsys.readouterr().err
  assert "checkpoint at step 4, past --train.steps 2" in err and "note:" not in err  # refused first
  assert (wd / "config.json").read_text() == config  # the refused --train.steps used to be written there
  assert json.loads((wd / "summary.json").read_text())["steps"] == 4
  assert ranker.main(["--workdir", str(wd), "--train.steps", "2", "--fresh"] + SMOKE) == 0
  assert json.loads((wd / "summary.json").read_text())["steps"] == 2


def test_probe_statistics_resume_with_their_checkpoint(tmp_path, capsys):
  from jaxrec.precision.probe import ProbeState
  from train.probe import check_run
  common = ["--train.checkpoint_every", "5", "--probe.every", "1"] + SMOKE
  a, b = tmp_path / "a", tmp_path / "b"
  assert ranker.main(["--workdir", str(a), "--train.steps", "10"] + common) == 0
  assert ranker.main(["--workdir", str(b), "--train.steps", "5"] + common) == 0
  assert ranker.main(["--workdir", str(b), "--train.steps", "10"] + common) == 0
  assert int(ProbeState.load(a / "probe_stats.npz").updates) == 10
  assert int(ProbeState.load(b / "probe_stats.npz").updates) == 10  # continued, not restarted
  assert ProbeState.saved_step(b / "probe_stats.npz") == 10
  # killed after the statistics of step 10 were written but before its async checkpoint finished:
  # resuming from step 5 with them would count steps 6-10 twice (15 updates)
  shutil.rmtree(b / "checkpoints" / "10")
  capsys.readouterr()
  assert ranker.main(["--workdir", str(b), "--train.steps", "10"] + common) == 0
  assert "belongs to step 10, not to the checkpoint at step 5" in capsys.readouterr().err
  assert int(ProbeState.load(b / "probe_stats.npz").updates) == 5
  # a damaged statistics file on resume: a note and fresh statistics, not a traceback
  with (b / "probe_stats.npz").open("r+b") as f:
    f.truncate(100)
  shutil.rmtree(b / "checkpoints" / "10")
  assert ranker.main(["--workdir", str(b), "--train.steps", "10"] + common) == 0
  assert "not a probe_stats.npz" in capsys.readouterr().err
  assert int(ProbeState.load(b / "probe_stats.npz").updates) == 5  # steps 6-10
  check_run(b)
  # going on without --probe.every leaves the statistics behind the checkpoints: said, and probing refuses them
  assert ranker.main(["--workdir", str(b), "--train.steps", "15", "--train.checkpoint_every", "5"] + SMOKE) == 0
  assert "holds the Probe's statistics up to step 10; this run goes on without --probe.every" in capsys.readouterr().err
  with pytest.raises(ValueError, match="statistics of step 10, but its newest checkpoint is step 15.*without --probe"):
    check_run(b)


def test_killed_and_resumed_matches_uninterrupted(tmp_path):
  """SIGKILL a real training process after its step-20 checkpoint; the resumed run matches."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  # 300 steps take seconds after the step-20 checkpoint, so the kill lands mid-run
  args = ["--train.steps", "300", "--train.checkpoint_every", "10"] + SMOKE
  cmd = [sys.executable, "-m", "train.ranker"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  subprocess.run(cmd + ["--workdir", str(full)] + args, cwd=REPO, env=env, check=True, capture_output=True)
  proc = subprocess.Popen(cmd + ["--workdir", str(killed)] + args, cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  try:
    while not (killed / "checkpoints" / "20").exists():
      assert proc.poll() is None, "training ended before it could be killed"
      assert time.time() < deadline, "no step-20 checkpoint within 240 s"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (killed / "summary.json").exists()
  subprocess.run(cmd + ["--workdir", str(killed)] + args, cwd=REPO, env=env, check=True, capture_output=True)
  assert_trees_equal(final_params(full, 300), final_params(killed, 300))


def test_smoke_config_trains_and_restores(tmp_path):
  from jaxrec.training.loop import train_and_evaluate
  s = train_and_evaluate(ranker.smoke(), tmp_path / "smoke")
  assert s["steps"] == 20 and np.isfinite(s["eval_ne"]) and np.isfinite(s["oracle_ne"])
  restored = final_params(tmp_path / "smoke", 20)
  assert int(restored["step"]) == 20 and np.all(np.isfinite(restored["table"]))


def test_a_run_saved_before_new_config_fields_still_resumes(tmp_path):
  """config.json written by an older version (without fields added since) is not a conflict."""
  import json

  from jaxrec.training.loop import prepare_workdir, unlock_workdir
  from train.ranker import smoke
  cfg = smoke()
  try:
    prepare_workdir(cfg, tmp_path)
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)  # a saved step: the run resumes, so configs are compared
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["data"]["count_features"], saved["model"]["precision_plan"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    prepare_workdir(cfg, tmp_path)  # no WorkdirConflictError
  finally:
    unlock_workdir(tmp_path)  # prepare_workdir locks the workdir; the entrypoints release it


def test_delayed_scaling_histories_are_checkpointed_and_resume_exactly(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  common = ["--train.checkpoint_every", "4", "--model.precision_plan", "uniform:fp8_delayed",
            "--model.dcnv2.compute_dtype", "bfloat16"] + SMOKE
  assert ranker.main(["--workdir", str(a), "--train.steps", "8"] + common) == 0
  assert ranker.main(["--workdir", str(b), "--train.steps", "4"] + common) == 0
  assert ranker.main(["--workdir", str(b), "--train.steps", "8"] + common) == 0
  fa, fb = final_params(a, 8), final_params(b, 8)
  assert_trees_equal(fa, fb)
  hist = _leaves(fa["fp8"])
  assert hist and all(h.shape == (3, 1024) and np.all(h[:, :8] > 0) and not np.any(h[:, 8:]) for h in hist.values())


def test_a_run_keeps_its_plan_file_and_plan_errors_are_clear(tmp_path, capsys):
  """A run trained under a plan file restores after the file is gone (its copy, trained_plan.json);
  resuming under a changed file is a conflict; a missing, malformed or foreign plan is a clear error."""
  from jaxrec.precision.plan import PrecisionPlan, SitePrecision
  from jaxrec.training.restore import read_run
  plan = PrecisionPlan(sites={"top.layers.0": SitePrecision.uniform("fp8_row")})
  path = tmp_path / "plan.json"
  plan.save(path)
  wd = tmp_path / "run"
  common = ["--workdir", str(wd), "--model.precision_plan", str(path), "--train.checkpoint_every", "4"] + SMOKE
  assert ranker.main(common + ["--train.steps", "4"]) == 0
  assert PrecisionPlan.load(wd / "trained_plan.json") == plan
  PrecisionPlan.uniform("fp8_tensor").save(path)  # the file changes under the run
  assert ranker.main(common + ["--train.steps", "8"]) == 2
  assert "different precision plan" in capsys.readouterr().err
  path.unlink()
  cfg, _ = read_run(wd)
  assert PrecisionPlan.load(cfg.model.precision_plan) == plan
  pinned = ["--workdir", str(wd), "--model.precision_plan", str(wd / "trained_plan.json")] + SMOKE
  assert ranker.main(pinned + ["--train.steps", "2", "--fresh"]) == 0  # --fresh does not lose the plan it trains under
  assert PrecisionPlan.load(wd / "trained_plan.json") == plan
  capsys.readouterr()
  with pytest.raises(SystemExit):  # the config is refused before any data is read
    ranker.main(common + ["--train.steps", "8"])
  assert "no such file" in capsys.readouterr().err
  path.write_text("{not json")
  with pytest.raises(SystemExit):
    ranker.main(common + ["--train.steps", "8"])
  assert "not a readable JSON file" in capsys.readouterr().err
  PrecisionPlan(sites={"top.layers.7": SitePrecision.uniform("bf16")}).save(path)
  assert ranker.main(["--workdir", str(tmp_path / "other"), "--model.precision_plan", str(path),
                      "--train.steps", "2"] + SMOKE) == 2
  assert "does not have: ['top.layers.7']" in capsys.readouterr().err


def test_a_ranker_and_a_user_model_never_share_a_workdir(tmp_path, capsys):
  """Each refuses (even with --fresh) a workdir holding the other's checkpoints, and leaves it as it was."""
  from train import user_model
  wd = tmp_path / "run"
  (wd / "checkpoints" / "4").mkdir(parents=True)
  (wd / "config.json").write_text("{}")
  (wd / "schema.json").write_text('{"ranker": true}')
  assert user_model.main(["--workdir", str(wd), "--fresh", "--train.steps", "2", "--no-train.progress"]) == 2
  assert "holds checkpoints but no user_model.json" in capsys.readouterr().err
  assert (wd / "checkpoints" / "4").exists() and (wd / "schema.json").read_text() == '{"ranker": true}'
  assert not (wd / "user_model.json").exists()
  (wd / "config.json").rename(wd / "user_model.json")
  assert ranker.main(["--workdir", str(wd), "--fresh", "--train.steps", "2"] + SMOKE) == 2
  assert "holds checkpoints but no config.json" in capsys.readouterr().err
  assert (wd / "checkpoints" / "4").exists() and not (wd / "config.json").exists()


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 host devices (tests/conftest.py sets XLA_FLAGS)")
def test_a_run_resumes_and_restores_on_another_device_count(tmp_path):
  """The ads world's 1443 table rows pad to 1448 on 8 devices: a run trained on 1 device resumes on 8,
  and restores on 1 (as serving and train.probe --from_run do) with another row multiple."""
  from jaxrec.training import sharding
  from jaxrec.training.restore import read_run, restore_ranker
  wd = tmp_path / "run"
  common = ["--workdir", str(wd), "--train.checkpoint_every", "2"] + SMOKE[:-2]  # without --train.num_devices
  assert ranker.main(common + ["--train.steps", "2", "--train.num_devices", "1"]) == 0
  assert ranker.main(common + ["--train.steps", "4", "--train.num_devices", "8"]) == 0
  saved = final_params(wd, 4)
  assert int(saved["step"]) == 4 and saved["table"].shape == (1448, 8)
  cfg, schema = read_run(wd)
  _, state, _ = restore_ranker(cfg, schema, wd, sharding.make_mesh(1), row_multiple=1)
  assert state.table.shape == (1443, 8)
  np.testing.assert_array_equal(np.asarray(state.table), saved["table"][:1443])


def test_running_a_finished_run_again_logs_its_final_eval_once(tmp_path):
  wd = tmp_path / "run"
  args = ["--workdir", str(wd), "--train.steps", "4", "--train.checkpoint_every", "2",
          "--train.eval_every", "2"] + SMOKE
  assert ranker.main(args) == 0
  first = (wd / "metrics.jsonl").read_text()
  assert ranker.main(args) == 0  # nothing left to train: evaluates step 4 again, in place of the earlier record
  records = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "eval/click/ne" in r] == [2, 4]
  assert [r["step"] for r in records if "train/loss" in r] == [4]  # log_every 5: only the last step logs
  assert len(records) == len(first.splitlines())
