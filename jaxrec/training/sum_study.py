"""The SUM study: does a frozen upstream user embedding improve small downstream rankers?

`run_sum_study(cfg, workdir)`:
  1. trains the user model (`train_user_model`) on the world's train stream, every domain, on
     several times the downstream rankers' data, into WORKDIR/user_model;
  2. shared ranker: trains the same small downstream ranker on every domain's traffic with
     `train_and_evaluate`, once on the plain features (WORKDIR/ranker_base/seed<s>) and once with the
     frozen tower's embedding appended (`DataConfig.user_model`, WORKDIR/ranker_sum/seed<s>), for
     each seed in `seeds` (same seed, steps, batches and eval rows within a pair), and evaluates the
     final checkpoints per domain;
  3. per-domain rankers (`per_domain`): SUM's setting of one downstream model per surface. For
     each domain, the same small ranker is trained on that domain's traffic alone over the same
     world period as step 2 (so the data-poor domain's ranker gets about 5% of the examples), with
     and without the embedding, and evaluated on that domain's rows of the same eval set;
  4. writes WORKDIR/sum_study.json (everything) and WORKDIR/sum_study.md (the tables).

Per slice the tables give the click (and conversion) NE without and with the embedding (means over
seeds), the mean relative change with each seed's change, the oracle NE (true probabilities on the
same rows) and the share of the base ranker's gap to the oracle that the embedding closes.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxrec.config import config_to_dict
from jaxrec.data.adsworld import AdsWorldConfig
from jaxrec.data.batch import Batch, Schema
from jaxrec.data.domain_stream import DomainStreamSource
from jaxrec.data.pipeline import BatchSource, pad_batch, train_iterator
from jaxrec.data.sources import DataConfig, _world, open_train_eval, parse_spec, train_eval_specs
from jaxrec.data.user_embedding import UserEmbeddingSource
from jaxrec.metrics import MetricAccumulator
from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.domain_eval import DomainMetrics
from jaxrec.training.loop import LoopConfig, RankerConfig, make_workdir, train_and_evaluate
from jaxrec.training.restore import restore_ranker
from jaxrec.training.state import plan_train_state
from jaxrec.training.step import OptimConfig, batch_shardings, dense_optimizer, make_eval_step, make_train_step
from jaxrec.training.user_model import FrozenUserTower, UserDataConfig, UserModelConfig, load_user_model, \
    train_user_model

VARIANTS = ("base", "sum")  # without / with the user embedding
TASKS = ("click", "conversion")


SET_BY_STUDY = {"tower.data.world": "set --world.* instead", "ranker.data.world": "set --world.* instead",
                "ranker.data.user_model": "it trains its own", "ranker.model.seed": "set --seeds instead",
                "tower.fresh": "set --fresh instead", "ranker.fresh": "set --fresh instead"}
"""fields of the nested run configs that the study sets itself (not options: `python -m train.sum_study`'s
--help leaves them out), with what to set instead"""


def small_ranker() -> RankerConfig:
  """The downstream ranker of the study: a small DCNv2 on about 1M examples (a world day and a half)."""
  return RankerConfig(
      data=DataConfig(batch_size=512, eval_batch_size=4096, eval_examples=100_000),
      model=ModelConfig(dcnv2=DCNv2Config(embed_dim=8, bottom_mlp=(32,), num_cross=2, top_mlp=(64, 32))),
      optim=OptimConfig(),
      train=LoopConfig(steps=2000, log_every=200, eval_every=0, checkpoint_every=2000, num_devices=1),
  )


def default_tower() -> UserModelConfig:
  """The upstream user model of the study: six times the ranker's examples, every domain."""
  return UserModelConfig(
      data=UserDataConfig(batch_size=1024, eval_examples=100_000),
      train=LoopConfig(steps=6000, log_every=200, eval_every=0, checkpoint_every=6000, num_devices=1),
  )


@dataclasses.dataclass(frozen=True)
class SumStudyConfig:
  world: AdsWorldConfig = AdsWorldConfig()
  """the ads world both models use (overrides tower.data.world and ranker.data.world)"""
  tower: UserModelConfig = default_tower()
  """the upstream user model (python -m train.user_model's config)"""
  ranker: RankerConfig = small_ranker()
  """the downstream ranker, trained with and without the embedding (python -m train.ranker's config;
  ranker.data.user_model and ranker.model.seed are set by the study)"""
  seeds: tuple[int, ...] = (0, 1)
  """downstream model seeds: each runs both variants; tables report the mean and each seed's change"""
  per_domain: bool = True
  """also train one ranker per domain on that domain's traffic alone (SUM's many downstream models)"""
  fresh: bool = True
  """start the user model and the shared rankers over (False: resume what the workdir holds)"""

  def __post_init__(self):
    if not self.seeds:
      raise ValueError("seeds must name at least one seed")
    if parse_spec(self.ranker.data.train).format != "adsworld":
      raise ValueError(f"the study needs the ads world; ranker.data.train is {self.ranker.data.train!r}")
    train_eval_specs(self.ranker.data)  # the same data or shared rows: refused now, not after the user model
    set_by_study = {"tower.data.world": (self.tower.data.world, AdsWorldConfig()),
                    "ranker.data.world": (self.ranker.data.world, AdsWorldConfig()),
                    "ranker.data.user_model": (self.ranker.data.user_model, ""),
                    "ranker.model.seed": (self.ranker.model.seed, 0),
                    "tower.fresh": (self.tower.fresh, False),
                    "ranker.fresh": (self.ranker.fresh, False)}
    for name, (value, default) in set_by_study.items():
      if value != default:
        raise ValueError(f"{name} is set by the study, not by --{name} ({SET_BY_STUDY[name]})")


def ranker_variant(cfg: SumStudyConfig, user_model: str, seed: int) -> RankerConfig:
  data = dataclasses.replace(cfg.ranker.data, world=cfg.world, user_model=user_model)
  return dataclasses.replace(cfg.ranker, data=data, model=dataclasses.replace(cfg.ranker.model, seed=seed),
                             fresh=cfg.fresh)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSet:
  """The study's eval rows for one variant, generated once: schema and host batches."""

  schema: Schema
  batches: list[Batch]


def eval_sets(cfg: SumStudyConfig, tower: FrozenUserTower) -> dict[str, EvalSet]:
  """The shared eval rows (the ranker's eval stream over its training period), without / with the
  embedding: the same rows, so every ranker of the study is compared on them."""
  rc = ranker_variant(cfg, "", cfg.seeds[0])
  _, base = open_train_eval(rc.data, rc.train.steps * rc.data.batch_size)
  with_emb = UserEmbeddingSource(base, tower)
  return {"base": EvalSet(base.schema, list(base.eval_batches(rc.data.eval_batch_size))),
          "sum": EvalSet(with_emb.schema, list(with_emb.eval_batches(rc.data.eval_batch_size)))}


def evaluate_ranker_by_domain(cfg: RankerConfig, workdir: Path, evals: EvalSet) -> dict:
  """Restores a train_and_evaluate workdir's final checkpoint and evaluates it per domain."""
  mesh = sharding.make_mesh(cfg.train.num_devices)
  graphdef, state, state_sh = restore_ranker(cfg, evals.schema, workdir, mesh, row_multiple=mesh.devices.size)
  bsh = batch_shardings(mesh, True)
  eval_step = make_eval_step(graphdef, state_sh, bsh)
  acc = DomainMetrics(evals.schema.labels, evals.schema.num_domains)
  for b in evals.batches:
    acc.add(b.labels, np.asarray(eval_step(state, jax.device_put(b, bsh))), b.weights, b.true_prob, b.domain)
  return acc.result()


# ----- per-domain rankers -------------------------------------------------------------------------


class RankerTrainer:
  """Trains cfg.model from scratch on any source of one schema, for any seed and step count.

  The jitted train and eval steps are built once and reused for every (source, seed): the per-domain
  rankers of a variant share their shapes, so they compile once. No checkpoints are written.
  """

  def __init__(self, cfg: RankerConfig, schema, has_truth: bool):
    self.cfg, self.schema = cfg, schema
    self.mesh = sharding.make_mesh(cfg.train.num_devices)
    self.tx = dense_optimizer(cfg.optim)
    graphdef, _, _, self.state_sh = plan_train_state(self._model_fn(cfg.model.seed), self.tx, self.mesh)
    self.bsh = batch_shardings(self.mesh, has_truth)
    self.step = make_train_step(graphdef, self.tx, cfg.optim, self.state_sh, self.bsh)
    self.eval_step = make_eval_step(graphdef, self.state_sh, self.bsh)
    self._inits: dict[int, Callable] = {}

  def _model_fn(self, seed: int):
    model = dataclasses.replace(self.cfg.model, seed=seed)
    return lambda: build_model(self.schema, model, row_multiple=self.mesh.devices.size)

  def fit(self, source: BatchSource, steps: int, seed: int, desc: str) -> Callable[[Batch], np.ndarray]:
    """Trains on batches 0 .. steps-1 of `source`; returns predict(host batch) -> probabilities [B, T]."""
    if source.schema != self.schema:
      raise ValueError("RankerTrainer.fit: the source's schema differs from the one the steps were built for")
    if seed not in self._inits:  # one compiled initialiser per seed
      self._inits[seed] = plan_train_state(self._model_fn(seed), self.tx, self.mesh)[1]
    state = self._inits[seed]()
    with progress(steps, desc, enabled=self.cfg.train.progress) as bar:
      for b in train_iterator(source, batch_size=self.cfg.data.batch_size, start=0, stop=steps):
        state, _ = self.step(state, jax.device_put(b, self.bsh))
        bar.update(1)
    return lambda b: np.asarray(self.eval_step(state, jax.device_put(b, self.bsh)))


def _domain_rows(batches: list[Batch], domain: int, batch_size: int) -> list[Batch]:
  """The real rows of `domain` in `batches`, re-batched into padded batches of batch_size."""
  keep = [jax.tree.map(lambda x, m=(b.domain == domain) & (b.weights > 0): x[m], b) for b in batches]
  rows = jax.tree.map(lambda *xs: np.concatenate(xs), *keep)
  n = rows.labels.shape[0]
  return [pad_batch(jax.tree.map(lambda x, s=s: x[s:s + batch_size], rows), batch_size)
          for s in range(0, n, batch_size)]


def _metrics(predict, batches: list[Batch], tasks: tuple[str, ...]) -> dict[str, float]:
  acc = MetricAccumulator(tasks)
  for b in batches:
    acc.add(b.labels, predict(b), b.weights, b.true_prob)
  return acc.result()


def run_per_domain(cfg: SumStudyConfig, tower: FrozenUserTower, evals: dict[str, EvalSet]) -> dict:
  """One ranker per domain on its own traffic over the shared rankers' world period, both variants."""
  world = _world(cfg.world)
  rc = ranker_variant(cfg, "", cfg.seeds[0])
  stream, bs = parse_spec(rc.data.train).path, rc.data.batch_size
  period_end = float(world.batch_extras(stream, rc.train.steps - 1, bs)["timestamp_s"][-1])
  trainers = {v: RankerTrainer(rc, evals[v].schema, True) for v in VARIANTS}
  out = {}
  for d in range(cfg.world.num_domains):
    base_src = DomainStreamSource(world, stream, d, eval_examples=0)
    n = base_src.num_examples_before(period_end)
    steps = max(n // bs, 1)
    sources = {"base": base_src, "sum": UserEmbeddingSource(base_src, tower)}
    res: dict = {"train_examples": steps * bs, "steps": steps}
    for variant in VARIANTS:
      rows = _domain_rows(evals[variant].batches, d, rc.data.eval_batch_size)
      for seed in cfg.seeds:
        predict = trainers[variant].fit(sources[variant], steps, seed, f"domain {d} ranker, {variant}, seed {seed}")
        res.setdefault(variant, {})[str(seed)] = _metrics(predict, rows, evals[variant].schema.labels)
    out[str(d)] = res
  return out


# ----- tables -------------------------------------------------------------------------------------


def _row(name: str, share: float, per_seed_base: list[dict], per_seed_sum: list[dict], task: str,
         train_examples: int | None = None) -> dict:
  nan = float("nan")
  ne_b = np.array([m.get(f"{task}/ne", nan) for m in per_seed_base])
  ne_s = np.array([m.get(f"{task}/ne", nan) for m in per_seed_sum])
  oracle = float(per_seed_base[0].get(f"{task}/oracle_ne", float("nan")))
  change = ne_s / ne_b - 1.0
  gap = float(ne_b.mean() - oracle)
  row = {
      "slice": name, "traffic_share": share, "eval_rows": int(per_seed_base[0][f"{task}/count"]),
      "ne_base": float(ne_b.mean()), "ne_sum": float(ne_s.mean()), "ne_change": float(change.mean()),
      "ne_change_per_seed": [float(c) for c in change], "oracle_ne": oracle,
      "gap_closed": float((ne_b.mean() - ne_s.mean()) / gap) if gap > 0 else float("nan"),
  }
  if train_examples is not None:
    row["train_examples"] = train_examples
  return row


def shared_rows(results: dict, cfg: SumStudyConfig, task: str) -> list[dict]:
  total = sum(cfg.world.domain_traffic)
  seeds = [str(s) for s in cfg.seeds]
  rows = []
  for part in ["all"] + [str(d) for d in range(cfg.world.num_domains)]:
    share = 1.0 if part == "all" else cfg.world.domain_traffic[int(part)] / total
    rows.append(_row(part, share, [results["base"][s][part] for s in seeds],
                     [results["sum"][s][part] for s in seeds], task))
  return rows


def per_domain_rows(results: dict, cfg: SumStudyConfig, task: str) -> list[dict]:
  total = sum(cfg.world.domain_traffic)
  seeds = [str(s) for s in cfg.seeds]
  return [_row(d, cfg.world.domain_traffic[int(d)] / total, [r["base"][s] for s in seeds],
               [r["sum"][s] for s in seeds], task, r["train_examples"]) for d, r in results.items()]


def markdown_table(rows: list[dict], conflict_domain: int) -> str:
  with_train = "train_examples" in rows[0]
  cols = ["slice", "traffic"] + (["train examples"] if with_train else []) + [
      "eval rows", "NE without embedding", "NE with embedding", "change (mean; per seed)", "oracle NE",
      "gap to oracle closed"]
  lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
  for r in rows:
    name = "all domains" if r["slice"] == "all" else f"domain {r['slice']}"
    if r["slice"] != "all" and int(r["slice"]) == conflict_domain:
      name += " (conflicting)"
    per_seed = ", ".join(f"{c:+.2%}" for c in r["ne_change_per_seed"])
    cells = [name, f"{r['traffic_share']:.0%}"] + ([f"{r['train_examples']:,}"] if with_train else []) + [
        f"{r['eval_rows']:,}", f"{r['ne_base']:.4f}", f"{r['ne_sum']:.4f}", f"**{r['ne_change']:+.2%}** ({per_seed})",
        f"{r['oracle_ne']:.4f}", f"{r['gap_closed']:.0%}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ----- the study ----------------------------------------------------------------------------------


def run_sum_study(cfg: SumStudyConfig, workdir: str | Path) -> dict:
  """Runs the study (module docstring); returns what sum_study.json holds."""
  workdir = Path(workdir)
  rc = ranker_variant(cfg, "", cfg.seeds[0])
  for name, run in (("tower", cfg.tower), ("ranker", rc)):  # refused now, not after minutes of training
    sharding.training_mesh(run.train.num_devices, run.data.batch_size, run.data.eval_batch_size, f"--{name}.data")
  make_workdir(workdir)
  t0 = time.perf_counter()
  seconds = {}
  tower_cfg = dataclasses.replace(cfg.tower, data=dataclasses.replace(cfg.tower.data, world=cfg.world),
                                  fresh=cfg.fresh)
  tower_dir = workdir / "user_model"
  tower_summary = train_user_model(tower_cfg, tower_dir)
  seconds["user_model"] = time.perf_counter() - t0

  t = time.perf_counter()
  tower = load_user_model(tower_dir)
  evals = eval_sets(cfg, tower)
  seconds["eval_rows"] = time.perf_counter() - t
  t = time.perf_counter()
  shared: dict = {v: {} for v in VARIANTS}
  summaries: dict = {v: {} for v in VARIANTS}
  for seed in cfg.seeds:
    for variant, um in zip(VARIANTS, ("", str(tower_dir))):
      rcfg = ranker_variant(cfg, um, seed)
      wd = workdir / f"ranker_{variant}" / f"seed{seed}"
      summaries[variant][str(seed)] = train_and_evaluate(rcfg, wd)
      shared[variant][str(seed)] = evaluate_ranker_by_domain(rcfg, wd, evals[variant])
  seconds["shared_rankers"] = time.perf_counter() - t

  per_domain = None
  if cfg.per_domain:
    t = time.perf_counter()
    per_domain = run_per_domain(cfg, tower, evals)
    seconds["per_domain_rankers"] = time.perf_counter() - t
  seconds["total"] = time.perf_counter() - t0

  out = {
      "date": datetime.date.today().isoformat(),
      "tables": {"shared": {task: shared_rows(shared, cfg, task) for task in TASKS}},
      "tower": tower_summary,
      "shared_rankers": {"by_domain": shared, "summaries": summaries},
      "seconds": seconds,
      "train_examples": {"user_model": tower_cfg.train.steps * tower_cfg.data.batch_size,
                         "ranker": cfg.ranker.train.steps * cfg.ranker.data.batch_size},
      "config": config_to_dict(cfg),
  }
  if per_domain is not None:
    out["tables"]["per_domain"] = {task: per_domain_rows(per_domain, cfg, task) for task in TASKS}
    out["per_domain_rankers"] = per_domain
  (workdir / "sum_study.json").write_text(json.dumps(out, indent=2) + "\n")
  (workdir / "sum_study.md").write_text(study_markdown(out, cfg, tower_cfg))
  return out


def study_markdown(out: dict, cfg: SumStudyConfig, tower_cfg: UserModelConfig) -> str:
  tw = out["tower"]
  conflict = cfg.world.conflict_domain
  md = [f"# SUM study: a frozen user embedding in small downstream rankers ({out['date']})", "",
        f"User model: {out['train_examples']['user_model']:,} examples of every domain, "
        f"{tower_cfg.model.num_embeddings} x {tower_cfg.model.emb_dim}-dim embedding; its own click NE "
        f"{tw['eval_click_ne']:.4f} (oracle {tw.get('oracle_click_ne', float('nan')):.4f}). "
        f"Downstream: a small DCNv2, seeds {', '.join(map(str, cfg.seeds))}, the same seed and batches with "
        f"and without the embedding. Wall time {out['seconds']['total']:.0f} s.", "",
        f"## One ranker on every domain ({out['train_examples']['ranker']:,} examples)", "",
        "Click:", "", markdown_table(out["tables"]["shared"]["click"], conflict),
        "Conversion:", "", markdown_table(out["tables"]["shared"]["conversion"], conflict)]
  if "per_domain" in out["tables"]:
    md += ["## One ranker per domain, each on its own traffic over the same world period", "",
           "Click:", "", markdown_table(out["tables"]["per_domain"]["click"], conflict),
           "Conversion:", "", markdown_table(out["tables"]["per_domain"]["conversion"], conflict)]
  return "\n".join(md)
