"""Orbax checkpoints of the TrainState under WORKDIR/checkpoints/<step>.

Restoring takes the abstract state with its shardings, so a checkpoint comes back directly into
the current mesh. Together with step-indexed data (batch i is a pure function of i) this makes
resume exact: a run killed after a checkpoint and restarted reaches the same parameters,
bit for bit on CPU, as one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxrec.training.state import TrainState


class Checkpointer:

  def __init__(self, workdir: Path, *, max_to_keep: int = 2):
    self.directory = (Path(workdir) / "checkpoints").absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),  # item_metadata reads the saved tree
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, abstract: TrainState, shardings: TrainState, step: int | None = None) -> TrainState:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if "fp8" in self.manager.item_metadata(step):
      return self.manager.restore(step, args=ocp.args.StandardRestore(target))
    # written before TrainState had `fp8` (2026-12-06): fine for a model without fp8_delayed sites
    if abstract.fp8:
      raise ValueError(f"the checkpoint at step {step} under {self.directory} predates fp8 amax histories, and "
                       "this model has fp8_delayed sites: it cannot be restored into it")
    rest = {f: getattr(target, f) for f in ("step", "params", "opt_state", "table", "table_acc")}
    return TrainState(**self.manager.restore(step, args=ocp.args.StandardRestore(rest)), fp8={})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
