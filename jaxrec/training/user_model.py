"""Training the upstream user model (SUM), and loading it frozen for downstream rankers.

`train_user_model(cfg, workdir)` trains `jaxrec.models.user_tower.UserTowerModel` on an ads-world
stream with history features (`jaxrec.data.user_history`), on every domain's traffic and both
objectives (click, conversion), with the rankers' jitted steps, resuming from the newest
checkpoint in `workdir`. It writes there:

    checkpoints/<step>/   orbax checkpoints of the TrainState
    user_model.json       the full UserModelConfig (what marks a user-model workdir)
    schema.json           the feature schema the tower was built for (ads world + history)
    eval_span.json        the training period the eval is spread over (kept from the first start)
    table.json            {"row_multiple": n}: the fused table's rows were rounded up to a multiple of n
    embedding_stats.json  per-dimension mean and std of the embeddings over training-stream rows,
                          for the final checkpoint of every run that finished in the workdir
    metrics.jsonl         training loss and eval metrics (overall and per domain "d<k>/...")
    summary.json          final eval NE / AUC per objective, overall and per domain, examples/s

`load_user_model(workdir)` restores the newest checkpoint as a `FrozenUserTower`: parameters that
nothing updates, and a jitted forward of the user tower alone whose output is standardised
(per dimension, by the statistics of `embedding_stats.json`) so downstream rankers get
unit-scale features.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxrec.config import config_from_dict
from jaxrec.data.adsworld import AdsWorld, AdsWorldConfig
from jaxrec.data.batch import Batch, Schema
from jaxrec.data.errors import DataSpecError
from jaxrec.data.pipeline import train_iterator
# _world: the one shared world per config
from jaxrec.data.sources import AdsWorldSource, _world, check_stream_length, check_stream_name
from jaxrec.data.user_history import HistoryConfig, HistorySource, UserHistory, add_history, user_history
from jaxrec.models.user_tower import UserTowerConfig, build_user_tower
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.checkpoint import Checkpointer
from jaxrec.training.domain_eval import evaluate_by_domain, flatten
from jaxrec.training.loop import (EVAL_SPAN, LoopConfig, StepClock, append_jsonl, checked_mean_loss,
                                  drop_records_after, eval_span, open_checkpointer, prepare_workdir,
                                  releases_workdir_lock)
from jaxrec.training.state import TrainState, merge_model, plan_train_state, table_rows_used
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_eval_step, make_train_step

CONFIG_FILE = "user_model.json"
TABLE_FILE = "table.json"  # {"row_multiple": n}: the fused table's rows were rounded up to a multiple of n
STATS_FILE = "embedding_stats.json"
STATS_BATCHES = 16  # training-stream batches (spread over the run) the standardisation statistics use
RUN_FILES = ("metrics.jsonl", "summary.json", CONFIG_FILE, "schema.json", TABLE_FILE, STATS_FILE, EVAL_SPAN)


@dataclasses.dataclass(frozen=True)
class UserDataConfig:
  train: str = "train"
  """ads-world stream the user model trains on (every domain's traffic)"""
  eval: str = "eval"
  """ads-world stream it is evaluated on"""
  batch_size: int = 1024
  """training batch size (a multiple of the device count)"""
  eval_batch_size: int = 4096
  """eval batch size"""
  eval_examples: int = 100_000
  """eval examples (rounded up to whole eval batches), spread evenly over the period training covered"""
  world: AdsWorldConfig = AdsWorldConfig()
  """the synthetic ads world (downstream rankers must use the same one)"""
  history: HistoryConfig = HistoryConfig()
  """the recent-history features (jaxrec.data.user_history)"""

  def __post_init__(self):
    for name in ("batch_size", "eval_batch_size", "eval_examples"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("train", "eval"):  # the user model trains on the ads world only: bare stream names
      check_stream_name(getattr(self, name), f"data.{name}")
    if self.train == self.eval:
      raise ValueError(f"data.train and data.eval are the same stream ({self.train!r})")


@dataclasses.dataclass(frozen=True)
class UserModelConfig:
  data: UserDataConfig = UserDataConfig()
  model: UserTowerConfig = UserTowerConfig()
  optim: OptimConfig = OptimConfig()
  train: LoopConfig = LoopConfig(steps=3000, log_every=100, eval_every=0, checkpoint_every=1000)
  fresh: bool = False
  """start over: delete this run's checkpoints, metrics and summary in the workdir first"""


class UserModelError(DataSpecError):
  """A user-model workdir is missing, is not one, has no checkpoint, or does not fit the data."""


def open_user_sources(cfg: UserDataConfig, span: int) -> tuple[HistorySource, HistorySource]:
  """(train, eval) ads-world sources with history features; eval spread over the stream's first
  `span` examples (the training period, `loop.eval_span`)."""
  world = _world(cfg.world)
  train = HistorySource(AdsWorldSource(world, cfg.train, cfg.eval_examples), cfg.history)
  evl = HistorySource(AdsWorldSource(world, cfg.eval, cfg.eval_examples, span), cfg.history)
  return train, evl


@releases_workdir_lock
def train_user_model(cfg: UserModelConfig, workdir: Path) -> dict:
  """Trains (or resumes) the user model and evaluates it per domain; returns summary.json's dict.
  The workdir is locked while it runs (`lock_workdir`)."""
  steps, bs = cfg.train.steps, cfg.data.batch_size
  # before anything is written into the workdir
  mesh = sharding.training_mesh(cfg.train.num_devices, bs, cfg.data.eval_batch_size)
  prepare_workdir(cfg, workdir, run_files=RUN_FILES, config_file=CONFIG_FILE, what="a user model")
  train_src, eval_src = open_user_sources(cfg.data, eval_span(workdir, steps * bs))
  check_stream_length(train_src.base, steps * bs, "--train.steps x --data.batch_size")
  check_stream_length(eval_src.base, eval_src.base.eval_examples_read(cfg.data.eval_batch_size),
                      "the evaluation, spread over the training period,")
  schema = train_src.schema
  (workdir / "schema.json").write_text(json.dumps(schema.to_json(), indent=2) + "\n")

  tx = dense_optimizer(cfg.optim)
  n_dev = mesh.devices.size
  (workdir / TABLE_FILE).write_text(json.dumps({"row_multiple": n_dev}) + "\n")
  model_fn = lambda: build_user_tower(schema, cfg.model, row_multiple=n_dev)  # noqa: E731
  graphdef, init, abstract, state_sh = plan_train_state(model_fn, tx, mesh)
  ckpt, state = open_checkpointer(workdir, cfg.train.max_to_keep, steps, init=init, abstract=abstract,
                                  shardings=state_sh, model_fn=model_fn)
  start = int(state.step)
  train_bsh, eval_bsh = batch_shardings(mesh, True), batch_shardings(mesh, True)
  train_step = make_train_step(graphdef, tx, cfg.optim, state_sh, train_bsh)
  eval_step = make_eval_step(graphdef, state_sh, eval_bsh)

  def run_eval(state: TrainState) -> dict:
    return evaluate_by_domain(lambda b: eval_step(state, b), eval_src, cfg.data.eval_batch_size,
                              lambda b: jax.device_put(b, eval_bsh))

  metrics_path = workdir / "metrics.jsonl"
  # logged by a killed run after its last checkpoint; a run with no steps left re-evaluates its last
  drop_records_after(metrics_path, start, evals_at_step=start >= steps)
  batches = train_iterator(train_src, batch_size=bs, start=start, stop=steps)
  losses: list[jax.Array] = []
  clock = StepClock()
  try:
    with progress(steps - start, "train user model", enabled=cfg.train.progress) as bar:
      for step in range(start, steps):
        state, m = train_step(state, jax.device_put(next(batches), train_bsh))
        losses.append(m["loss"])
        done = step + 1
        clock.stepped(state)
        is_log = done % cfg.train.log_every == 0 or done == steps
        is_eval = cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0 and done != steps
        is_ckpt = done % cfg.train.checkpoint_every == 0 or done == steps
        if is_log or is_eval or is_ckpt:
          loss = checked_mean_loss(losses, done, workdir)
          losses = []
          clock.lap()
          rate = clock.rate(bs)
          if is_log:
            append_jsonl(metrics_path, {"step": done, "train/loss": loss, "examples_per_sec": rate})
          if is_eval:
            append_jsonl(metrics_path, {"step": done, **{f"eval/{k}": v for k, v in flatten(run_eval(state)).items()}})
          if is_ckpt:
            ckpt.save(done, state)
          bar.update(0, loss=f"{loss:.4f}", ex_s="-" if rate is None else f"{rate:,.0f}")
          clock.resume()  # the eval and checkpoint above are not training time
        bar.update(1)
    rate = clock.rate(bs)
    res = run_eval(state)
    final_step = int(state.step)
    rows = [train_src.train_batch(int(i), bs) for i in np.linspace(0, max(final_step - 1, 0), STATS_BATCHES)]
    emb = np.concatenate([np.asarray(_embed(graphdef, state.params, state.table, b.sparse, b.sparse_mask, b.dense))
                          for b in rows])
    _save_stats(workdir / STATS_FILE, final_step, emb)
    append_jsonl(metrics_path, {"step": final_step, **{f"eval/{k}": v for k, v in flatten(res).items()}})
  finally:  # after a Ctrl-C or an error too: finish a checkpoint being written, so the newest one restores
    batches.close()  # (and stop the prefetch threads)
    ckpt.close()
  tasks = schema.labels
  summary = {
      "steps": final_step,
      "examples_per_sec": rate,
      "train_stream": cfg.data.train,
      "train_examples": final_step * bs,
      "embedding_dim": cfg.model.num_embeddings * cfg.model.emb_dim,
      "embedding_std_mean": float(emb.std(0).mean()),
      "devices": n_dev,
      "eval": {part: {k: v for k, v in m.items() if k.split("/")[1] in ("ne", "oracle_ne", "auc", "count")}
               for part, m in res.items()},
  }
  for t in tasks:
    summary[f"eval_{t}_ne"] = res["all"][f"{t}/ne"]
    summary[f"eval_{t}_auc"] = res["all"][f"{t}/auc"]
    if f"{t}/oracle_ne" in res["all"]:
      summary[f"oracle_{t}_ne"] = res["all"][f"{t}/oracle_ne"]
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


# ----- the frozen tower ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenUserTower:
  """A trained user tower restored for inference only. Nothing updates `params` or `table`.

  `embed(batch)` takes a batch of the tower's schema (ads world + history features) and returns
  f32 [B, K D]; `embed_batch(batch, stream)` takes a plain ads-world batch of `stream` and adds the
  history first; `embed_users(user_id, timestamp_s, stream)` needs only users and times. Outputs
  are standardised: (tower output - mean) / std, per dimension, with `mean`, `std` [K D] measured
  on training-stream rows when the tower finished training.
  """

  workdir: Path
  config: UserModelConfig
  schema: Schema
  step: int
  graphdef: nnx.GraphDef
  params: dict
  table: jax.Array
  mean: np.ndarray
  std: np.ndarray

  @property
  def out_features(self) -> int:
    return self.config.model.num_embeddings * self.config.model.emb_dim

  @property
  def world_config(self) -> AdsWorldConfig:
    return self.config.data.world

  def history(self, world: AdsWorld, stream: str) -> UserHistory:
    return user_history(world, stream, self.config.data.history)

  def embed(self, batch: Batch) -> np.ndarray:
    """f32 [B, K D]: the standardised user embeddings of a batch of the tower's schema (host numpy)."""
    raw = np.asarray(_embed(self.graphdef, self.params, self.table, batch.sparse, batch.sparse_mask, batch.dense))
    return ((raw - self.mean) / self.std).astype(np.float32)

  def embed_batch(self, batch: Batch, world: AdsWorld, stream: str) -> np.ndarray:
    """f32 [B, K D] for a plain ads-world batch read from `stream` of `world`."""
    return self.embed(add_history(batch, world, self.history(world, stream)))

  def embed_users(self, user_id: np.ndarray, timestamp_s: np.ndarray, world: AdsWorld, stream: str) -> np.ndarray:
    """f32 [N, K D]: users' embeddings at times (seconds), with their history in `stream`.

    Only the user features are filled (id, segment, activity, history); the tower reads no other.
    """
    user_id = np.asarray(user_id, np.int64)
    n, schema = user_id.size, world.schema
    names = [f.name for f in schema.sparse]
    sparse = np.zeros((n, schema.num_sparse, 1), np.int32)
    sparse[:, names.index("user_id"), 0] = user_id
    sparse[:, names.index("user_segment"), 0] = world.entities.user_segment[user_id]
    dense = np.zeros((n, schema.num_dense), np.float32)
    dense[:, schema.dense.index("user_activity")] = world.entities.user_activity_x[user_id]
    zeros = np.zeros(n)
    base = Batch(dense=dense, sparse=sparse, sparse_mask=np.ones(sparse.shape, bool), labels=zeros[:, None],
                 weights=zeros, domain=zeros.astype(np.int32),
                 timestamp=np.floor(np.asarray(timestamp_s, np.float64)).astype(np.int32))
    return self.embed_batch(base, world, stream)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef: nnx.GraphDef, params: dict, table: jax.Array, sparse, sparse_mask, dense) -> jax.Array:
  model = merge_model(graphdef, params, table)
  return model.user_embedding(Batch(dense=dense, sparse=sparse, sparse_mask=sparse_mask, labels=None,
                                    weights=None, domain=None, timestamp=None))


def _save_stats(path: Path, step: int, emb: np.ndarray) -> None:
  """Writes the embedding statistics of checkpoint `step` to `path`, keeping earlier steps' under
  "by_step" (a run resumed in the same workdir must not standardise an older checkpoint with a
  newer one's statistics); the top level holds the newest step's."""
  old = json.loads(path.read_text()) if path.exists() else {}
  by_step = dict(old.get("by_step", {}))  # a file from before steps were recorded has none to keep
  entry = {"mean": emb.mean(0).tolist(), "std": emb.std(0).tolist(), "rows": int(emb.shape[0])}
  by_step[str(step)] = entry
  path.write_text(json.dumps({"step": step, **entry, "by_step": by_step}) + "\n")


def _stats_for(stats: dict, step: int, workdir, hint: str) -> dict:
  """The statistics of checkpoint `step` (a file written before steps were recorded holds one set,
  used for any step, as it always was)."""
  entry = stats.get("by_step", {}).get(str(step))
  if entry is None and stats.get("step", step) == step:
    entry = stats
  if entry is None:
    known = sorted(int(k) for k in stats.get("by_step", {}))
    raise UserModelError(f"user model {str(workdir)!r}: no embedding statistics for checkpoint {step} (they are "
                         f"computed when a training run finishes; known for steps {known}); load one of those "
                         f"steps or let the training finish; {hint}")
  return entry


def load_user_model(workdir: str | Path, step: int | None = None) -> FrozenUserTower:
  """Restores a `train_user_model` workdir's newest checkpoint (or `step`) for inference.

  Raises UserModelError (a DataSpecError) naming the problem: no such directory, not a user-model
  workdir (no user_model.json: e.g. a ranker's), or no checkpoint yet.
  """
  wd = Path(workdir)
  hint = f"train one with: python -m train.user_model --workdir {workdir}"
  if not wd.is_dir():
    raise UserModelError(f"user model {str(workdir)!r}: no such directory; {hint}")
  if not (wd / CONFIG_FILE).exists():
    what = " (it looks like a ranker's workdir)" if (wd / "config.json").exists() else ""
    raise UserModelError(f"user model {str(workdir)!r} is not a user-model workdir: it has no {CONFIG_FILE}{what}; "
                         f"{hint}")
  try:
    cfg = config_from_dict(UserModelConfig, json.loads((wd / CONFIG_FILE).read_text()))
    schema = Schema.from_json(json.loads((wd / "schema.json").read_text()))
    row_multiple = int(json.loads((wd / TABLE_FILE).read_text())["row_multiple"])
    stats = json.loads((wd / STATS_FILE).read_text()) if (wd / STATS_FILE).exists() else None
  except (OSError, ValueError, KeyError) as e:
    raise UserModelError(f"user model {str(workdir)!r}: unreadable {CONFIG_FILE} or schema.json ({e})") from e
  if not (wd / "checkpoints").is_dir():  # checked first: the Checkpointer would create the folder
    raise UserModelError(f"user model {str(workdir)!r} has no checkpoint yet; {hint}")
  ckpt = Checkpointer(wd, max_to_keep=cfg.train.max_to_keep)
  try:
    if ckpt.latest_step() is None:
      raise UserModelError(f"user model {str(workdir)!r} has no checkpoint yet; {hint}")
    mesh = sharding.make_mesh(1)
    model_fn = lambda: build_user_tower(schema, cfg.model, row_multiple=row_multiple)  # noqa: E731
    graphdef, _, abstract, state_sh = plan_train_state(model_fn, dense_optimizer(cfg.optim), mesh)
    state = ckpt.restore(abstract, state_sh, step, table_rows_used=table_rows_used(model_fn))
  finally:
    ckpt.close()
  if stats is None:
    raise UserModelError(f"user model {str(workdir)!r} has no {STATS_FILE}: its training did not finish; {hint}")
  stats = _stats_for(stats, int(state.step), workdir, hint)
  std = np.maximum(np.asarray(stats["std"], np.float32), 1e-6)
  return FrozenUserTower(workdir=wd, config=cfg, schema=schema, step=int(state.step), graphdef=graphdef,
                         params=state.params, table=state.table, mean=np.asarray(stats["mean"], np.float32), std=std)
