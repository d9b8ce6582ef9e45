"""The training loop: data -> jitted steps -> metrics, checkpoints, summary, plot.

`train_and_evaluate(cfg, workdir)` trains a ranker, resuming from the newest checkpoint in
`workdir` when there is one, and writes there:

    checkpoints/<step>/   orbax checkpoints of the TrainState
    config.json           the full config (a resumed run must match it, `train.steps` aside)
    trained_plan.json     a copy of the precision plan file the model trained under (if
                          --model.precision_plan names a file), so the run restores and serves
                          after that file moves
    schema.json           the feature schema the model was built for
    eval_span.json        the training period (examples) an ads-world eval is spread over, kept from
                          the run's first start so that a resume with more steps evaluates the same rows
    metrics.jsonl         one JSON object per log or eval event
    summary.json          final eval metrics, steps, examples/s
    curves.png            training curves
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import config_from_dict, config_to_dict
from jaxrec.data.batch import Batch, Schema
from jaxrec.data.pipeline import BatchSource, train_iterator
from jaxrec.data.sources import DataConfig, open_train_eval
from jaxrec.metrics import MetricAccumulator
from jaxrec.models import ModelConfig, build_model, is_plan_file, parse_precision_plan
from jaxrec.precision.plan import PrecisionPlan
from jaxrec.plotting import plot_training_curves
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.checkpoint import Checkpointer
from jaxrec.precision.probe import ProbeConfig, ProbeState
from jaxrec.training.probe_step import init_probe_state, make_probe_step, place as place_probe
from jaxrec.training.state import TrainState, plan_train_state, table_rows_used
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 12000
  """total training steps (a resumed run continues up to this many)"""
  log_every: int = 200
  """write the mean training loss and throughput every this many steps"""
  eval_every: int = 3000
  """evaluate every this many steps (0 = only at the end)"""
  checkpoint_every: int = 3000
  """save a checkpoint every this many steps (and always at the end)"""
  max_to_keep: int = 2
  """checkpoints kept on disk"""
  num_devices: int = 0
  """devices in the data-parallel mesh (0 = all local devices)"""
  progress: bool = True
  """show a progress bar"""

  def __post_init__(self):
    for name in ("steps", "log_every", "checkpoint_every", "max_to_keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_every < 0 or self.num_devices < 0:
      raise ValueError("train.eval_every and train.num_devices must be >= 0")


@dataclasses.dataclass(frozen=True)
class RankerConfig:
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  optim: OptimConfig = OptimConfig()
  train: LoopConfig = LoopConfig()
  probe: ProbeConfig = ProbeConfig(every=0)
  """LoKA's Probe: per-GEMM-site operand statistics every `every` steps (0 = off), saved to probe_stats.npz"""
  fresh: bool = False
  """start over: delete this run's checkpoints, metrics and summary in the workdir first"""


class TrainingDivergedError(ValueError):
  """The training loss became NaN or infinite (a learning rate too high, or bad input values)."""


def checked_mean_loss(losses: list[jax.Array], done: int, workdir: Path) -> float:
  """The mean of the step losses since the last log; TrainingDivergedError if it is not finite (call
  it before a checkpoint of NaN parameters is saved over a good one)."""
  loss = float(jnp.mean(jnp.stack(losses)))
  if not np.isfinite(loss):
    raise TrainingDivergedError(
        f"training diverged: the mean loss of steps up to {done} is {loss}; lower --optim.dense_lr / "
        f"--optim.embedding_lr (the last good checkpoint is kept in {workdir / 'checkpoints'})")
  return loss


def checkpoint_steps(workdir: str | Path) -> list[int]:
  """The steps of WORKDIR/checkpoints' finished checkpoints, ascending (a <step> folder; one being
  written is <step>.orbax-checkpoint-tmp)."""
  ckpts = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def has_checkpoint(workdir: str | Path) -> bool:
  """Whether WORKDIR/checkpoints holds a finished checkpoint."""
  return bool(checkpoint_steps(workdir))


def interrupted_message(workdir: str | Path) -> str:
  """What a training entrypoint prints on Ctrl-C or SIGTERM."""
  if not has_checkpoint(workdir):
    return "\ninterrupted before the first checkpoint: the same command starts the run over"
  return f"\ninterrupted: run the same command again to resume from the newest checkpoint in {workdir}/checkpoints"


class WorkdirConflictError(ValueError):
  """The workdir cannot take this run: it holds a run whose config differs from the one asked to
  resume it, or another kind of run, or it is not a directory that can be created and written."""


TRAINED_PLAN = "trained_plan.json"
EVAL_SPAN = "eval_span.json"
USER_MODEL_STEP = "user_model_step.json"
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "config.json", "schema.json", "probe_stats.npz",
             TRAINED_PLAN, EVAL_SPAN, USER_MODEL_STEP)


def eval_span(workdir: Path, examples: int) -> int:
  """The training period, in examples, an ads-world eval stream is spread over: `examples` (steps x
  batch size) when the run starts, and on resume the value its first start saved in
  WORKDIR/eval_span.json. The eval rows depend on it, so a run resumed with more --train.steps
  evaluates the rows it evaluated before and its metrics.jsonl stays one curve over one eval set
  (its eval then covers the first start's period, said on stderr)."""
  path = workdir / EVAL_SPAN
  if has_checkpoint(workdir) and path.exists():
    saved = _read_saved(path, "examples", "be resumed on its eval rows")
    if saved != examples:
      print(f"note: evaluating on the rows this run evaluated before (spread over its first start's "
            f"{saved:,} training examples, not over {examples:,}), so that its eval records stay comparable",
            file=sys.stderr)
    return saved
  path.write_text(json.dumps({"examples": examples}) + "\n")
  return examples


def _read_saved(path: Path, key: str, why: str) -> int:
  """The integer `key` of a run's JSON record at `path` (eval_span.json, user_model_step.json);
  WorkdirConflictError when it is unreadable (the run cannot `why`)."""
  try:
    return int(json.loads(path.read_text())[key])
  except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
    raise WorkdirConflictError(f"{path} is unreadable ({type(e).__name__}: {e}), so the run in {path.parent} cannot "
                               f"{why}; pass --fresh to start over, or use another --workdir") from None


def user_model_step(workdir: Path, user_model: str) -> int | None:
  """The checkpoint step of `user_model` (--data.user_model) a ranker run trains on: on resume the
  step its first start used (WORKDIR/user_model_step.json, written by `pin_user_model_step`), so
  that a user model trained on meanwhile does not change the ranker's inputs halfway; None on a
  first start (the newest step), without a user model, or for a run started before steps were
  pinned. WorkdirConflictError when the user model no longer holds that step."""
  path = workdir / USER_MODEL_STEP
  if not user_model or not (has_checkpoint(workdir) and path.exists()):
    return None
  step = _read_saved(path, "step", "be resumed on the user-model checkpoint it trained on")
  steps = checkpoint_steps(user_model)
  if step not in steps:
    raise WorkdirConflictError(
        f"{workdir} trained on user model {user_model}'s checkpoint at step {step:,}, which it no longer holds "
        f"(it holds steps {steps}): resuming on another would change the ranker's inputs halfway; pass --fresh to "
        "start over on the newest one, or use another --workdir")
  if steps[-1] != step:
    print(f"note: training on user model {user_model}'s step {step:,}, the one this run started on, not its "
          f"newest step {steps[-1]:,} (pass --fresh to start over on that one)", file=sys.stderr)
  return step


def pin_user_model_step(workdir: Path, user_model: str, step: int) -> None:
  """Records the user-model checkpoint step a ranker run trains on (see `user_model_step`)."""
  (workdir / USER_MODEL_STEP).write_text(json.dumps({"user_model": str(user_model), "step": int(step)}) + "\n")


def open_run_data(run_dir: Path, cfg) -> tuple[BatchSource, BatchSource]:
  """The (train, eval) sources of a finished or stopped ranker run, as it trained and evaluated:
  its first start's eval span and user-model step, where it recorded them."""
  examples = cfg.train.steps * cfg.data.batch_size
  span_path = run_dir / EVAL_SPAN
  span = _read_saved(span_path, "examples", "be evaluated on its eval rows") if span_path.exists() else examples
  return open_train_eval(cfg.data, examples, span, user_model_step=user_model_step(run_dir, cfg.data.user_model))


def make_workdir(path: str | Path) -> Path:
  """Creates the output directory `path` (and its parents) and checks it is writable;
  WorkdirConflictError saying why when it cannot be (a file in the way, no permission, ...)."""
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write_test"
    probe.touch()
    probe.unlink()
  except OSError as e:
    raise WorkdirConflictError(f"cannot use {path} as an output directory: {e.strerror or e}") from None
  return path


_LOCKS: dict[Path, object] = {}
"""the workdir locks this process holds (open files), by resolved path"""


def lock_workdir(workdir: Path) -> None:
  """Takes an exclusive lock on WORKDIR/.lock until `unlock_workdir` (or the process ends, however it
  ends: the OS drops it); WorkdirConflictError naming the holder's pid when another process holds it,
  since two runs writing checkpoints and metrics into one folder would interleave them silently."""
  key = workdir.resolve()
  if key in _LOCKS:  # this process holds it already
    return
  f = open(workdir / ".lock", "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise WorkdirConflictError(f"{workdir} is in use by another run (pid {holder}); wait for it to finish, "
                               "or use another --workdir") from None
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()}\n")
  f.flush()
  _LOCKS[key] = f


def unlock_workdir(workdir: Path) -> None:
  """Releases `lock_workdir`'s lock (nothing when this process holds none)."""
  f = _LOCKS.pop(Path(workdir).resolve(), None)
  if f is not None:
    f.close()


def releases_workdir_lock(train: Callable[[Any, Path], dict]) -> Callable[[Any, str | Path], dict]:
  """Wraps a `train(cfg, workdir: Path)` whose prepare_workdir locks the workdir: the wrapped one takes
  a str or Path and releases the lock however `train` ends."""
  @functools.wraps(train)
  def run(cfg, workdir: str | Path) -> dict:
    try:
      return train(cfg, Path(workdir))
    finally:
      unlock_workdir(Path(workdir))
  return run


def prepare_workdir(cfg, workdir: Path, *, run_files: tuple[str, ...] = RUN_FILES,
                    config_file: str = "config.json", what: str = "a run") -> None:
  """Creates `workdir`, clears it for `cfg.fresh`, refuses to resume a run whose data / model /
  optim config differs (fields added since it was saved count as their defaults) or to write into
  another kind of run's workdir (checkpoints without `config_file`), saves `cfg`.

  `cfg` is any config dataclass with `fresh`, `data`, `model` and `optim` fields. Locks the workdir
  first (`lock_workdir`): one run at a time."""
  make_workdir(workdir)
  lock_workdir(workdir)
  if (workdir / "checkpoints").exists() and not (workdir / config_file).exists():
    # every run writes its config before its first checkpoint: these belong to another kind of run
    # (a user model's workdir given to a ranker, or the reverse), which even --fresh must not delete
    raise WorkdirConflictError(
        f"{workdir} holds checkpoints but no {config_file}, so it is not {what}'s workdir (another kind of "
        "run lives there); use another --workdir")
  if cfg.fresh:
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    for name in run_files:
      (workdir / name).unlink(missing_ok=True)
  if (workdir / "checkpoints").exists():  # a run that could not write its checkpoints learns it now, not at the first
    make_workdir(workdir / "checkpoints")
  saved = workdir / config_file
  mine = config_to_dict(cfg)
  if saved.exists() and has_checkpoint(workdir):  # a run that saved no checkpoint has nothing to resume
    try:
      old = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise WorkdirConflictError(f"{saved} is unreadable ({e}), so the run in {workdir} cannot be resumed; "
                                 "pass --fresh to start over, or use another --workdir") from None
    try:  # fill fields added since the run was saved with their defaults before comparing
      old = config_to_dict(config_from_dict(type(cfg), old))
    except ValueError:
      pass  # a config this version cannot read: compared as saved, so it conflicts
    for section in ("data", "model", "optim"):
      if old.get(section) != mine[section]:
        raise WorkdirConflictError(
            f"{workdir} holds {what} with a different '{section}' config; resume it with the same "
            "settings, pass --fresh to start over, or use another --workdir")
  done = checkpoint_steps(workdir)
  if done and done[-1] > cfg.train.steps:  # refused before config.json takes the refused --train.steps
    raise _past_steps(workdir, done[-1], cfg.train.steps)
  saved.write_text(json.dumps(mine, indent=2) + "\n")


def _past_steps(workdir: Path, latest: int, steps: int) -> WorkdirConflictError:
  return WorkdirConflictError(f"{workdir} holds a checkpoint at step {latest:,}, past --train.steps {steps:,}: "
                              f"pass --train.steps {latest} or more to go on from it, or --fresh to start over")


def pin_precision_plan(spec: str, plan: PrecisionPlan | None, workdir: Path) -> None:
  """Writes `plan` (the one in the plan file `spec` names, read before --fresh cleared the workdir,
  which may have held that file) into the run as trained_plan.json, which restoring prefers
  (restore.read_run_config).
  Resuming a run whose copy differs from the file now at `spec` is a WorkdirConflictError: the
  checkpoints were trained under the copy."""
  if not is_plan_file(spec):
    return
  pinned = workdir / TRAINED_PLAN
  if pinned.exists() and has_checkpoint(workdir) and PrecisionPlan.load(pinned) != plan:
    raise WorkdirConflictError(
        f"{workdir} holds a run trained under a different precision plan than {spec} now holds; put the "
        f"run's plan back there (its copy is {pinned}), pass --fresh to start over, or use another --workdir")
  plan.save(pinned)


def evaluate(eval_step, state: TrainState, source: BatchSource, schema: Schema, batch_size: int,
             batch_sh: Batch) -> dict[str, float]:
  """Runs the whole eval stream; returns metrics keyed "<task>/<metric>"."""
  acc = MetricAccumulator(schema.labels)
  for b in source.eval_batches(batch_size):
    probs = np.asarray(eval_step(state, jax.device_put(b, batch_sh)))
    acc.add(b.labels, probs, b.weights, b.true_prob)
  return acc.result()


def drop_records_after(path: Path, step: int, *, evals_at_step: bool = False) -> None:
  """Removes the records of steps after `step` from a metrics.jsonl (a resumed run logs them again),
  and with `evals_at_step` the eval records of `step` itself (a finished run, run again, evaluates
  its last step again)."""
  if not path.exists():
    return
  def keep(line: str) -> bool:
    try:
      record = json.loads(line)
      at = record.get("step", 0)
      return at < step or (at == step and not (evals_at_step and any(k.startswith("eval/") for k in record)))
    except (ValueError, AttributeError):  # a line the killed run left half-written
      return False

  lines = path.read_text().splitlines(keepends=True)
  kept = [ln for ln in lines if ln.strip() and keep(ln)]
  if len(kept) != len(lines):
    path.write_text("".join(kept))


def open_checkpointer(workdir: Path, max_to_keep: int, steps: int, *, init: Callable[[], TrainState],
                      abstract: TrainState, shardings: TrainState,
                      model_fn: Callable[[], Any]) -> tuple[Checkpointer, TrainState]:
  """The workdir's Checkpointer and the state to train from: its newest checkpoint restored into
  `abstract` with `shardings` (a run of another device count too: `table_rows_used(model_fn)`), else
  `init()`. WorkdirConflictError when the newest checkpoint is past `steps` (resuming would train
  nothing and report that later step as if asked for). When anything fails, the Checkpointer is closed."""
  ckpt = Checkpointer(workdir, max_to_keep=max_to_keep)
  try:
    latest = ckpt.latest_step()
    if latest is not None and latest > steps:
      raise _past_steps(workdir, latest, steps)
    state = init() if latest is None else ckpt.restore(abstract, shardings, table_rows_used=table_rows_used(model_fn))
  except BaseException:
    ckpt.close()
    raise
  return ckpt, state


class StepClock:
  """Training throughput over timed segments: the process's first step (compilation) is not timed,
  nor is what runs at a log / eval / checkpoint boundary (`lap` ends a segment, `resume` starts the
  next). `steps` and `seconds` are the totals of the ended segments."""

  def __init__(self):
    self.steps, self.seconds = 0, 0.0
    self._mark: float | None = None  # start of the current segment; None before the first step
    self._seg = 0

  def stepped(self, state) -> None:
    """After each training step (the first one blocks on `state` and starts the first segment)."""
    self._seg += 1
    if self._mark is None:
      jax.block_until_ready(state)
      self._mark, self._seg = time.perf_counter(), 0

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent inside the current segment (a compile) out of it."""
    if self._mark is not None:
      self._mark += seconds

  def lap(self) -> None:
    """Ends the current segment, adding its steps and time to the totals."""
    self.steps += self._seg
    self.seconds += time.perf_counter() - self._mark

  def resume(self) -> None:
    """Starts the next segment (after a boundary's eval, checkpoint and logging)."""
    self._mark, self._seg = time.perf_counter(), 0

  def rate(self, batch_size: int) -> float | None:
    """Examples/s over the ended segments; None while no step has been timed (a boundary at the
    process's first step), which is no measurement, not 0 examples/s."""
    return batch_size * self.steps / self.seconds if self.steps and self.seconds > 0 else None


def append_jsonl(path: Path, record: dict) -> None:
  """Appends one JSON record as a line (metrics.jsonl)."""
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


@releases_workdir_lock
def train_and_evaluate(cfg: RankerConfig, workdir: Path) -> dict:
  """Trains (or resumes) and evaluates; returns the summary that is also written to summary.json.
  The workdir is locked while it runs (`lock_workdir`)."""
  plan = parse_precision_plan(cfg.model.precision_plan)
  if plan is not None:
    plan.check_backend(jax.default_backend(), f"model.precision_plan {cfg.model.precision_plan!r}")
  # before anything is written into the workdir
  mesh = sharding.training_mesh(cfg.train.num_devices, cfg.data.batch_size, cfg.data.eval_batch_size)
  prepare_workdir(cfg, workdir)
  pin_precision_plan(cfg.model.precision_plan, plan, workdir)
  examples = cfg.train.steps * cfg.data.batch_size
  um_step = user_model_step(workdir, cfg.data.user_model)
  train_src, eval_src = open_train_eval(cfg.data, examples, eval_span(workdir, examples), user_model_step=um_step)
  if cfg.data.user_model:
    pin_user_model_step(workdir, cfg.data.user_model, train_src.tower.step)
  schema = train_src.schema
  (workdir / "schema.json").write_text(json.dumps(schema.to_json(), indent=2) + "\n")

  n_dev = mesh.devices.size
  tx = dense_optimizer(cfg.optim)
  model_fn = lambda: build_model(schema, cfg.model, row_multiple=n_dev)  # noqa: E731
  graphdef, init, abstract, state_sh = plan_train_state(model_fn, tx, mesh)

  ckpt, state = open_checkpointer(workdir, cfg.train.max_to_keep, cfg.train.steps, init=init, abstract=abstract,
                                  shardings=state_sh, model_fn=model_fn)
  start = int(state.step)

  train_bsh = batch_shardings(mesh, train_src.has_truth)
  eval_bsh = batch_shardings(mesh, eval_src.has_truth)
  train_step = make_train_step(graphdef, tx, cfg.optim, state_sh, train_bsh)
  eval_step = make_eval_step(graphdef, state_sh, eval_bsh)

  probe_every = cfg.probe.every
  probe_path = workdir / "probe_stats.npz"
  probe_seconds, probe_timed, probe_calls = 0.0, 0, 0
  if probe_every:
    probe_step = make_probe_step(graphdef, cfg.probe, mesh)
    fresh_probe = init_probe_state(graphdef, state, cfg.probe, mesh)
    probe_state = fresh_probe
    saved_step = ProbeState.saved_step(probe_path) if start and probe_path.exists() else None
    if saved_step not in (None, start):
      # saved beside a checkpoint that never finished (the run was killed during its async save): its
      # statistics hold probe updates past the checkpoint resumed from, which would count them twice
      print(f"note: {probe_path} belongs to step {saved_step:,}, not to the checkpoint at step {start:,} this "
            "run resumes from; the Probe's statistics start afresh", file=sys.stderr)
    elif start and probe_path.exists():  # resumed: continue the saved statistics
      try:
        loaded = ProbeState.load(probe_path, cfg.probe.weight_decay)
      except ValueError as e:  # truncated or damaged
        print(f"note: {e}; the Probe's statistics start afresh", file=sys.stderr)
        loaded = fresh_probe
      if set(loaded.acts) == set(fresh_probe.acts):
        if not loaded.grads:  # saved before output gradients were probed: start their statistics now
          loaded = loaded.replace(grads=jax.device_get(fresh_probe.grads))
        probe_state = place_probe(loaded, mesh)
  elif start and probe_path.exists() and start < cfg.train.steps:
    print(f"note: {probe_path} holds the Probe's statistics up to step {ProbeState.saved_step(probe_path) or 0:,}; "
          "this run goes on without --probe.every, so they will not match its newer checkpoints (python -m "
          "train.probe --from_run refuses such a run); pass --probe.every N to keep them up to date", file=sys.stderr)
  metrics_path = workdir / "metrics.jsonl"
  steps, bs = cfg.train.steps, cfg.data.batch_size
  # logged by the killed run after its last checkpoint; a run with no steps left re-evaluates its last
  drop_records_after(metrics_path, start, evals_at_step=start >= steps)
  batches = train_iterator(train_src, batch_size=bs, start=start, stop=steps)
  losses: list[jax.Array] = []
  clock = StepClock()
  try:
    with progress(steps - start, f"train {cfg.model.kind}", enabled=cfg.train.progress) as bar:
      for step in range(start, steps):
        batch = jax.device_put(next(batches), train_bsh)
        state, m = train_step(state, batch)
        losses.append(m["loss"])
        if probe_every and (step + 1) % probe_every == 0:
          first = probe_calls < 2  # the first two calls of this process compile / warm up: not timed
          probe_calls += 1
          jax.block_until_ready(state)
          t_probe = time.perf_counter()
          probe_state = jax.block_until_ready(probe_step(probe_state, state, batch))
          if not first:
            probe_seconds += time.perf_counter() - t_probe
            probe_timed += 1
          else:  # keep the compile out of the training throughput too
            clock.exclude(time.perf_counter() - t_probe)
        done = step + 1
        clock.stepped(state)
        boundary_log = done % cfg.train.log_every == 0 or done == steps
        boundary_eval = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0 and done != steps
        boundary_ckpt = done % cfg.train.checkpoint_every == 0 or done == steps
        if boundary_log or boundary_eval or boundary_ckpt:
          loss = checked_mean_loss(losses, done, workdir)
          losses = []
          clock.lap()
          rate = clock.rate(bs)
          if boundary_log:
            append_jsonl(metrics_path, {"step": done, "train/loss": loss, "examples_per_sec": rate})
          if boundary_eval:
            res = evaluate(eval_step, state, eval_src, schema, cfg.data.eval_batch_size, eval_bsh)
            append_jsonl(metrics_path, {"step": done, **{f"eval/{k}": v for k, v in res.items()}})
          if boundary_ckpt:
            ckpt.save(done, state)
            if probe_every:
              probe_state.save(probe_path, step=done)
          bar.update(0, loss=f"{loss:.4f}", ex_s="-" if rate is None else f"{rate:,.0f}")
          clock.resume()
        bar.update(1)

    res = evaluate(eval_step, state, eval_src, schema, cfg.data.eval_batch_size, eval_bsh)
    final_step = int(state.step)
    append_jsonl(metrics_path, {"step": final_step, **{f"eval/{k}": v for k, v in res.items()}})
  finally:  # after a Ctrl-C or an error too: finish a checkpoint being written, so the newest one restores
    batches.close()  # (and stop the prefetch threads)
    ckpt.close()
  main_task = schema.labels[0]
  summary = {
      "steps": final_step,
      "examples_per_sec": clock.rate(bs),
      "eval_ne": res[f"{main_task}/ne"],
      "eval_auc": res[f"{main_task}/auc"],
      "eval_logloss": res[f"{main_task}/logloss"],
      "eval_calibration": res[f"{main_task}/calibration"],
      "task": main_task,
      "eval": res,
      "devices": n_dev,
      "device_kind": jax.devices()[0].device_kind,
      "model": cfg.model.kind,
      "train_data": cfg.data.train,
  }
  if probe_every:
    probe_state.save(probe_path, step=final_step)
    train_s = clock.seconds - probe_seconds
    summary.update(probe_every=probe_every, probe_updates=int(probe_state.updates), probe_timed_updates=probe_timed,
                   probe_seconds=probe_seconds,
                   probe_overhead=(probe_seconds / train_s) if probe_timed and train_s > 0 else None)
  if f"{main_task}/oracle_ne" in res:
    summary["oracle_ne"] = res[f"{main_task}/oracle_ne"]
    summary["ne_over_oracle"] = summary["eval_ne"] / summary["oracle_ne"] - 1.0
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  plot_training_curves(metrics_path, workdir / "curves.png", title=f"{cfg.model.kind} on {cfg.data.train}")
  return summary
