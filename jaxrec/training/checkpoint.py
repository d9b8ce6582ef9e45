"""Orbax checkpoints of the TrainState under WORKDIR/checkpoints/<step>.

Restoring takes the abstract state with its shardings, so a checkpoint comes back directly into
the current mesh. Together with step-indexed data (batch i is a pure function of i) this makes
resume exact: a run killed after a checkpoint and restarted reaches the same parameters,
bit for bit on CPU, as one that never stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxrec.interrupts import deferred_interrupts
from jaxrec.training.state import TrainState

FIELDS = ("step", "params", "opt_state", "table", "table_acc")  # what every checkpoint holds; newer ones add fp8


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be read back (emptied, partly copied or partly deleted), or a
  checkpoint that could not be written (disk full, permissions)."""


class _OneLineOrbaxErrors(logging.Filter):
  """Keeps the message of an error orbax logs from its background threads and drops the traceback (60 to
  100 lines each, several per failed save): the error itself reaches the caller as a CheckpointError."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


class Checkpointer:
  """Asynchronous orbax checkpoints under WORKDIR/checkpoints. `close()` (or `wait()`) finishes the save in
  flight; a save that failed (disk full, no permission) surfaces there or at the next `save` as a
  CheckpointError. While open, orbax's error logs are one line each (`_OneLineOrbaxErrors`)."""

  def __init__(self, workdir: Path, *, max_to_keep: int = 2):
    self.directory = (Path(workdir) / "checkpoints").absolute()
    self._log_filter = _OneLineOrbaxErrors()
    logging.getLogger("absl").addFilter(self._log_filter)
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),  # item_metadata reads the saved tree
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState) -> None:
    """Starts writing the checkpoint at `step` (after the one in flight, if any, has finished). A Ctrl-C
    or SIGTERM meanwhile takes effect once the write is started, so that `close()` can finish it."""
    try:
      with deferred_interrupts():
        self.manager.save(step, args=ocp.args.StandardSave(state))
    except (OSError, ValueError) as e:  # the save in flight failed, or this one could not start
      raise self._unwritable(e) from None

  def restore(self, abstract: TrainState, shardings: TrainState, step: int | None = None, *,
              table_rows_used: int | None = None) -> TrainState:
    """The checkpoint at `step` (default the newest), restored into `abstract` with `shardings`.

    table_rows_used: the rows of the embedding table the model's features own
    (`state.table_rows_used`). The rows past them only pad the table to a multiple of the training
    devices, so a run trained on another device count saved another row count; given this, such a
    checkpoint restores, its padding rows dropped or zero rows added. Any other difference in
    shape is a ValueError naming the arrays (the checkpoint was written for another model).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
      meta = self.manager.item_metadata(step)
    except ValueError as e:  # orbax: "Unable to retrieve default item ..." for an empty or partial step folder
      raise self._damaged(step, e) from None
    fields = FIELDS + ("fp8",)
    if "fp8" not in meta:
      # written before TrainState had `fp8` (2026-12-06): fine for a model without fp8_delayed sites
      if abstract.fp8:
        raise ValueError(f"the checkpoint at step {step} under {self.directory} predates fp8 amax histories, and "
                         "this model has fp8_delayed sites: it cannot be restored into it")
      fields = FIELDS
    want = {f: getattr(target, f) for f in fields}
    saved, wanted = _shapes({f: meta[f] for f in fields}), _shapes(want)
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    def padding(k: str) -> bool:  # only the table's padding rows differ
      return (k in ("table", "table_acc") and table_rows_used is not None and saved[k][1:] == wanted[k][1:]
              and min(saved[k][0], wanted[k][0]) >= table_rows_used)

    if not all(padding(k) for k in differ):
      shown = ", ".join(f"{k}: saved {saved.get(k)}, this model {wanted.get(k)}" for k in differ[:3])
      raise ValueError(f"the checkpoint at step {step} under {self.directory} was written for another model ({shown}"
                       f"{', ...' if len(differ) > 3 else ''}): it cannot be restored into this one")
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(want, strict=not differ))
    except Exception as e:  # tensorstore: array data missing or truncated; orbax re-raises some as bare Exception
      raise self._damaged(step, e) from None
    return TrainState(**{"fp8": {}, **restored})

  def _damaged(self, step: int, e: Exception) -> CheckpointError:
    root = e  # the innermost cause says what is wrong (OUT_OF_RANGE ...); the outer ones carry TensorStore specs
    while (root.__cause__ or root.__context__) is not None:
      root = root.__cause__ or root.__context__
    line = (str(root).splitlines() or [type(root).__name__])[0]
    line = line if len(line) <= 300 else line[:300] + "..."
    return CheckpointError(f"the checkpoint at step {step} under {self.directory} is incomplete or damaged "
                           f"({line}); remove {self.directory / str(step)} to use the one before it")

  def _unwritable(self, e: Exception) -> CheckpointError:
    line = (str(e).splitlines() or [type(e).__name__])[0]
    line = line if len(line) <= 300 else "..." + line[-250:]  # tensorstore's cause (No space left ...) comes last
    return CheckpointError(f"writing a checkpoint under {self.directory} failed ({line}); "
                           "the checkpoints that were finished are kept: make room or fix the permissions, then "
                           "run the same command again to resume")

  def wait(self) -> None:
    """Waits for the save in flight; CheckpointError when it failed."""
    try:
      self.manager.wait_until_finished()
    except (OSError, ValueError) as e:
      raise self._unwritable(e) from None

  def close(self) -> None:
    """Finishes the save in flight and closes; CheckpointError when that save failed (closed all the same)."""
    try:
      self.wait()
    finally:
      self.manager.close()
      logging.getLogger("absl").removeFilter(self._log_filter)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{"params/top/layers/0/kernel": shape, ...} of a state tree or of a checkpoint's metadata tree
  (which spells a namedtuple's fields and a list's indices as dict keys)."""
  def name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
