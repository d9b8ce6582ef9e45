"""Ctrl-C and SIGTERM: jaxrec.interrupts, and the training entrypoints, which finish the checkpoint they
were writing and say how to go on; a checkpoint that cannot be written is one line, not a traceback."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxrec.interrupts import entrypoint
from jaxrec.training import loop
from jaxrec.training import user_model as user_model_lib
from tests.training.test_ranker_entrypoint import SMOKE
from train import probe, ranker, user_model

USER_SMOKE = ["--data.batch_size", "128", "--data.eval_batch_size", "512", "--data.eval_examples", "2048",
              "--model.embed_dim", "8", "--model.user_mlp", "32", "--model.emb_dim", "8", "--model.mix_mlp", "32",
              "--no-train.progress", "--train.num_devices", "1"]


def test_an_interrupt_is_one_line_and_exit_status_130(capsys):
  @entrypoint
  def main(argv=None) -> int:
    raise KeyboardInterrupt

  assert main([]) == 130
  assert capsys.readouterr().err.strip() == "interrupted"


def test_sigterm_interrupts_like_ctrl_c_with_status_143_and_the_handler_is_put_back(capsys):
  before = signal.getsignal(signal.SIGTERM)
  went_on = []

  @entrypoint
  def main(argv=None) -> int:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises in here
    went_on.append(True)
    return 0

  assert main([]) == 143 and not went_on
  assert capsys.readouterr().err.strip() == "interrupted"
  assert signal.getsignal(signal.SIGTERM) is before


def _orbax_threads() -> set[threading.Thread]:
  return {t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()}


@pytest.mark.parametrize("entry, patch, argv", [
    (ranker, (loop, "evaluate"), SMOKE + ["--train.steps", "20", "--train.checkpoint_every", "10",
                                          "--train.eval_every", "0"]),
    (user_model, (user_model_lib, "evaluate_by_domain"), USER_SMOKE + ["--train.steps", "10", "--train.log_every",
                                                                      "5", "--train.checkpoint_every", "5",
                                                                      "--train.eval_every", "0"]),
], ids=["ranker", "user_model"])
def test_ctrl_c_in_the_final_eval_finishes_the_last_checkpoint(entry, patch, argv, tmp_path, monkeypatch, capsys):
  """The last checkpoint is written asynchronously while the final eval runs. A Ctrl-C there used to skip
  closing the checkpointer: the save was abandoned half-written (or, at exit, hung the process on orbax's
  thread after the workdir lock was released)."""
  def interrupted(*args, **kwargs):  # eval_every 0: the final eval is the only one
    raise KeyboardInterrupt

  monkeypatch.setattr(*patch, interrupted)
  before = _orbax_threads()
  wd = tmp_path / "run"
  assert entry.main(["--workdir", str(wd)] + argv) == 130
  assert "interrupted: run the same command again to resume" in capsys.readouterr().err
  steps = argv[argv.index("--train.steps") + 1]
  assert steps in {p.name for p in (wd / "checkpoints").iterdir()}, "the last checkpoint was not finished"
  assert not [p for p in (wd / "checkpoints").iterdir() if "tmp" in p.name]
  left = _orbax_threads() - before
  assert not left, f"threads outlived the run: {[t.name for t in left]}"
  monkeypatch.undo()
  assert entry.main(["--workdir", str(wd)] + argv) == 0  # resumes: nothing left to train, evaluates


def test_an_interrupt_before_the_first_checkpoint_says_the_run_starts_over(tmp_path, monkeypatch, capsys):
  """...and that run's config is not held against the next: there is nothing to resume."""
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(loop, "train_iterator", interrupted)
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd), "--train.steps", "20"] + SMOKE) == 130
  assert "interrupted before the first checkpoint: the same command starts the run over" in capsys.readouterr().err
  monkeypatch.undo()
  assert ranker.main(["--workdir", str(wd), "--train.steps", "10", "--optim.dense_lr", "0.0005"] + SMOKE) == 0


def test_sigterm_stops_training_like_ctrl_c(tmp_path):
  """What `kill`, `timeout` and schedulers send: it used to end the process on the spot, abandoning the
  checkpoint being written, with no word."""
  wd = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "train.ranker", "--workdir", str(wd), "--train.steps", "100000",
                           "--train.checkpoint_every", "5"] + SMOKE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.monotonic() + 180
    while not loop.has_checkpoint(wd):
      assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 143, err
  assert "interrupted: run the same command again to resume" in err and "Traceback" not in err, err
  assert not [p for p in (wd / "checkpoints").iterdir() if "tmp" in p.name]


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
  """Disk full mid-run: orbax's error (a tensorstore ValueError whose cause comes last) surfaced at the next
  save as hundreds of traceback lines."""
  import orbax.checkpoint as ocp

  cause = ('RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database at local file "' + "x" * 400
           + '": Failed to write 2193 bytes to file 5: No space left on device [os_error_code=\'28\']')

  def full(self, step, *args, **kwargs):
    raise ValueError(cause + "\nsecond line")

  monkeypatch.setattr(ocp.CheckpointManager, "save", full)
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd), "--train.steps", "10", "--train.checkpoint_every", "5"] + SMOKE) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: writing a checkpoint under {wd.absolute() / 'checkpoints'} failed") and \
      "No space left on device" in err and "second line" not in err and "\n" not in err, err


def test_orbax_error_logs_lose_their_tracebacks_while_a_checkpointer_is_open(tmp_path):
  import logging

  from jaxrec.training.checkpoint import Checkpointer
  absl = logging.getLogger("absl")
  record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/future.py", 1, "failed", (),
                             (ValueError, ValueError("x"), None))
  before = list(absl.filters)
  ckpt = Checkpointer(tmp_path)
  try:
    assert absl.filter(record) and record.exc_info is None and record.getMessage() == "failed"
    ours = logging.LogRecord("absl", logging.ERROR, "/repo/jaxrec/x.py", 1, "ours", (),
                             (ValueError, ValueError(), None))
    assert absl.filter(ours) and ours.exc_info is not None  # only orbax's
  finally:
    ckpt.close()
  assert absl.filters == before


def test_a_checkpoints_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
  wd = tmp_path / "run"
  assert ranker.main(["--workdir", str(wd), "--train.steps", "5", "--train.checkpoint_every", "5"] + SMOKE) == 0
  shutil.rmtree(wd / "checkpoints")
  (wd / "checkpoints").write_text("in the way")  # (permissions cannot stand for this: the suite may run as root)
  assert ranker.main(["--workdir", str(wd), "--train.steps", "10", "--train.checkpoint_every", "5"] + SMOKE) == 2
  assert f"cannot use {wd / 'checkpoints'} as an output directory" in capsys.readouterr().err


def test_an_interrupted_probe_leaves_no_earlier_plan_beside_the_new_run(tmp_path, monkeypatch, capsys):
  """An earlier probe's precision_plan.json left beside a new run was taken for its plan (train.ranker
  --model.precision_plan trusted it)."""
  wd = tmp_path / "probe"
  wd.mkdir()
  for name in probe.OUTPUTS:
    (wd / name).write_text("an earlier probe's")

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(probe, "train_and_evaluate", interrupted)
  assert probe.main(["--workdir", str(wd), "--train.steps", "20", "--probe.every", "10"] + SMOKE) == 130
  assert "interrupted: no plan was written" in capsys.readouterr().err
  assert not [name for name in probe.OUTPUTS if (wd / name).exists()]


def test_a_replay_cut_short_leaves_no_earlier_outputs(tmp_path, monkeypatch):
  """(Also a replay whose sources were all skipped: it draws no plots, and an earlier study's stayed.)"""
  from jaxrec.cache import replay_study
  wd = tmp_path / "replay"
  wd.mkdir()
  for name in replay_study.OUTPUTS:
    (wd / name).write_text("an earlier study's")

  def interrupted():
    raise KeyboardInterrupt

  monkeypatch.setattr(replay_study, "movielens_stream", interrupted)
  with pytest.raises(KeyboardInterrupt):
    replay_study.run_replay_study(replay_study.ReplayConfig(sources=("movielens",)), wd)
  assert not [name for name in replay_study.OUTPUTS if (wd / name).exists()]


def test_an_interrupt_during_a_deferred_step_waits_for_its_end():
  """Checkpointer.save starts a checkpoint's write this way: a signal in the middle of it used to leave a
  half-started <step>.orbax-checkpoint-tmp that the run's close() could not finish."""
  from jaxrec.interrupts import Terminated, deferred_interrupts
  done = []
  with pytest.raises(Terminated):
    with deferred_interrupts():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)  # would have raised in here
      done.append(True)
  assert done
  with pytest.raises(KeyboardInterrupt) as info:
    with deferred_interrupts():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      done.append(True)
  assert len(done) == 2 and not isinstance(info.value, Terminated)
