"""Restoring a ranker run (what `train_and_evaluate` leaves in a workdir) for evaluation or serving.

    cfg, schema = read_run(workdir)
    graphdef, state, state_sh = restore_ranker(cfg, schema, workdir, sharding.make_mesh(1),
                                               row_multiple=cfg.train.num_devices or jax.local_device_count())
    model = merge_state(graphdef, state)
"""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from jaxrec.config import config_from_dict
from jaxrec.data.batch import Schema
from jaxrec.models import build_model, is_plan_file
from jaxrec.training.checkpoint import Checkpointer
from jaxrec.training.loop import TRAINED_PLAN, RankerConfig
from jaxrec.training.state import TrainState, plan_train_state, table_rows_used
from jaxrec.training.step import dense_optimizer


def read_run_config(workdir: str | Path, *, hint: str = "not a training run's workdir") -> RankerConfig:
  """The run's config.json (FileNotFoundError with `hint` when missing). A run trained under a
  plan file gets its own copy of it (trained_plan.json) as model.precision_plan, so it restores
  after the file it was trained from moves or changes."""
  wd = Path(workdir)
  path = wd / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{wd} has no config.json: {hint}")
  try:  # a list, a string or sections of the wrong type fail below with AttributeError / TypeError
    d = json.loads(path.read_text())
    plan = d.get("model", {}).get("precision_plan", "")
    if isinstance(plan, str) and is_plan_file(plan) and (wd / TRAINED_PLAN).exists():
      d["model"]["precision_plan"] = str(wd / TRAINED_PLAN)
    return config_from_dict(RankerConfig, d)
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, or JSON of another shape
    raise ValueError(f"{path}: not a valid run config ({type(e).__name__}: {e}); {hint}") from None


def read_run(workdir: str | Path) -> tuple[RankerConfig, Schema]:
  """The run's config (read_run_config) and schema.json; FileNotFoundError naming the one that is missing."""
  wd = Path(workdir)
  cfg = read_run_config(wd)
  if not (wd / "schema.json").exists():
    raise FileNotFoundError(f"{wd} has no schema.json: not a training run's workdir")
  path = wd / "schema.json"
  try:
    return cfg, Schema.from_json(json.loads(path.read_text()))
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, or JSON of another shape
    raise ValueError(f"{path}: not a valid schema ({type(e).__name__}: {e})") from None


def restore_ranker(cfg: RankerConfig, schema: Schema, workdir: str | Path, mesh: Mesh, *, row_multiple: int,
                   step: int | None = None) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, state, state shardings) of the checkpoint at `step` (default the newest), restored
  onto `mesh`, its embedding table's rows padded to a multiple of `row_multiple` (any value: rows
  past the features' only pad the table, so a run trained on any device count restores)."""
  model_fn = lambda: build_model(schema, cfg.model, row_multiple=row_multiple)  # noqa: E731
  graphdef, _, abstract, state_sh = plan_train_state(model_fn, dense_optimizer(cfg.optim), mesh)
  ckpt = Checkpointer(workdir)
  try:
    state = ckpt.restore(abstract, state_sh, step, table_rows_used=table_rows_used(model_fn))
  finally:
    ckpt.close()
  return graphdef, state, state_sh


__all__ = ["read_run", "read_run_config", "restore_ranker"]
