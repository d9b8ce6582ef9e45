"""python -m train.probe: LoKA's Probe -> error model -> Dispatch -> precision_plan.json.

With no arguments: trains a small Mods ranker (no bias, BlockNorm, HardSwish) on the ads world
with the Probe collecting per-GEMM-site statistics every `probe.every` steps, then for every site
measures MERE of each candidate numerics (forward, input-gradient and weight-gradient GEMMs) on
operands sampled from the learned statistics, on N(0, 1) operands of the same shapes, and on the
trained model's real eval activations (real rows only, padding rows left out; fewer or smaller
samples, said so in report.md, when the eval split holds fewer than --samples x --rows rows);
Dispatch turns the learned MEREs (and, on a GPU, measured timings) into a plan. `--from_run DIR`
skips training and probes an existing run that was trained with `--probe.every N` (its
checkpoint, config.json and probe_stats.npz).

Writes to --workdir: precision_plan.json (the plan, one row per site and GEMM with the choice,
MERE and interval, speedup or "not timed", every MERE measured, the Probe's overhead),
report.md, mere_heatmap.png (learned operands) and mere_heatmap_real.png.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrec.config import config_to_dict, parse_config
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.sources import DataConfig
from jaxrec.interrupts import entrypoint, exit_status
from jaxrec.layers.dense import capture_gemm_operands, dense_modules, gemm_sites
from jaxrec.models import DCNv2Config, ModelConfig, build_model
from jaxrec.precision import dispatch
from jaxrec.precision.error_model import Gaussian, MatrixNormal, get_candidates, mere_for_site, mere_on_operands
from jaxrec.precision.probe import ProbeConfig, ProbeState
from jaxrec.precision.report import SETTINGS, plot_mere_heatmap, write_report
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.losses import weighted_bce
from jaxrec.training.loop import (LoopConfig, RankerConfig, WorkdirConflictError, checkpoint_steps, make_workdir,
                                  open_run_data, train_and_evaluate)
from jaxrec.training.restore import read_run, read_run_config, restore_ranker
from jaxrec.training.state import merge_state
from jaxrec.training.step import OptimConfig

MODS = DCNv2Config(use_bias=False, norm="block", activation="hard_swish", top_mlp=(256, 256))


def check_sampling(candidates: tuple[str, ...], samples: int, rows: int) -> None:
  """ValueError for error-model options that cannot work, raised when the config is made (before
  any training): fewer than 2 samples or rows, no candidate, unknown or repeated candidates."""
  if samples < 2 or rows < 2:
    raise ValueError(f"--samples and --rows must be >= 2, got {samples}, {rows}")
  if not candidates:
    raise ValueError("--candidates must name at least one numerics")
  get_candidates(candidates)


def check_model(model: ModelConfig) -> None:
  """ValueError for a model with no GEMM site to probe (logreg), raised before any training."""
  if model.kind != "dcnv2":
    raise ValueError(f"the {model.kind} model has no GEMM sites to probe; use --model.kind dcnv2")


TRAINING_FIELDS = ("data", "model", "optim", "train", "probe", "fresh")
"""Args fields that configure the training run (not used with --from_run)"""


@dataclasses.dataclass(frozen=True)
class Args:
  workdir: str = "runs/probe"
  """where the run (unless --from_run) and the plan, report and heatmaps go"""
  from_run: str = ""
  """probe an existing run's workdir instead of training (it must have been trained with --probe.every N)"""
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig(dcnv2=MODS)
  optim: OptimConfig = OptimConfig()
  train: LoopConfig = LoopConfig(steps=2000, log_every=200, eval_every=0, checkpoint_every=2000)
  probe: ProbeConfig = ProbeConfig()
  candidates: tuple[str, ...] = ("bf16", "fp8_tensor", "fp8_row", "fp8_block")
  """numerics scored by the error model (jaxrec.precision.error_model.CANDIDATES)"""
  samples: int = 16
  """synthetic operand samples per site and setting (the MERE interval is over these)"""
  rows: int = 256
  """rows of each sampled (and real) activation batch"""
  bound: float = dispatch.DEFAULT_BOUND
  """Dispatch's MERE bound (upper end of the 95% interval)"""
  plan_batch: int = 0
  """batch M of the GEMMs Dispatch times on a GPU (0 = the run's --data.batch_size over this machine's
  device count: each device's M under data-parallel training)"""
  timing_cache: str = str(dispatch.DEFAULT_CACHE_PATH)
  """Dispatch's on-disk timing cache (GPU only)"""
  seed: int = 0
  """seed of the error model's operand samples"""
  fresh: bool = False
  """start the training run over"""

  def __post_init__(self):
    check_sampling(self.candidates, self.samples, self.rows)
    if self.from_run:  # the run's own config.json says how it was trained and which data it evaluates
      ignored = [f.name for f in dataclasses.fields(self)
                 if f.name in TRAINING_FIELDS and getattr(self, f.name) != f.default]
      if ignored:
        raise ValueError(f"--from_run probes the run as it was trained: --{', --'.join(ignored)} (training options) "
                         "would be ignored; leave them out")
    else:
      check_model(self.model)
    if not self.bound > 0:
      raise ValueError(f"--bound must be > 0, got {self.bound}")
    if self.plan_batch < 0:
      raise ValueError(f"--plan_batch must be >= 0 (0 = --data.batch_size / devices), got {self.plan_batch}")


def load_stats(path: Path) -> ProbeState:
  """A run's probe_stats.npz; ValueError when it holds no Probe update (empty statistics: zero
  operands, on which every candidate's MERE reads 0 and the plan would take FP8 everywhere)."""
  stats = ProbeState.load(path)
  if int(stats.updates) < 1:
    raise ValueError(f"{path} holds no Probe update: the run stopped (or ended) before its first probe step; "
                     "train it with --probe.every N for at least N steps")
  return stats


def check_run(run_dir: Path) -> ProbeState:
  """The Probe statistics of a probed run, after checking that `run_dir` holds all a probe of it
  needs (FileNotFoundError or ValueError otherwise): it exists, its model has GEMM sites, its
  probe_stats.npz holds a Probe update of each of them, and its config.json, schema.json and a
  checkpoint are there. Reads no data and restores nothing: cheap enough to check every run first."""
  if not run_dir.is_dir():
    raise FileNotFoundError(f"{run_dir}: no such directory, so no probe_stats.npz to probe; give the workdir of "
                            "a run trained with --probe.every N")
  if (run_dir / "config.json").exists():  # a logreg run: its model, not its statistics, is the problem
    model = read_run_config(run_dir).model
    if model.kind != "dcnv2":
      raise ValueError(f"{run_dir} trained the {model.kind} model, which has no GEMM sites to probe; "
                       "probe a dcnv2 run")
  stats_path = run_dir / "probe_stats.npz"
  if not stats_path.exists():
    raise FileNotFoundError(f"{run_dir} has no probe_stats.npz: train it with --probe.every N (N <= steps)")
  stats = load_stats(stats_path)
  cfg, schema = read_run(run_dir)
  sites = gemm_sites(nnx.eval_shape(lambda: build_model(schema, cfg.model)))
  missing = sorted({s for s, _, _ in sites} - set(stats.acts))
  if missing:
    raise ValueError(f"probe_stats.npz of {run_dir} lacks GEMM sites {missing} of the model")
  done = checkpoint_steps(run_dir)
  if not done:
    raise FileNotFoundError(f"{run_dir} has no checkpoint (checkpoints/STEP): the run saved none")
  saved = ProbeState.saved_step(stats_path)
  if saved is not None and saved != done[-1]:  # probing would pair these statistics with the newest checkpoint
    why = ("the run went on without --probe.every: resume it with --probe.every N to bring them up to date"
           if saved < done[-1] else f"the run stopped while saving step {saved:,}: resume it (the same command) "
           "to finish that checkpoint")
    raise ValueError(f"probe_stats.npz of {run_dir} holds the statistics of step {saved:,}, but its newest checkpoint "
                     f"is step {done[-1]:,}, which probing restores ({why})")
  return stats


def load_run(run_dir: Path) -> tuple[RankerConfig, object, object]:
  """(config, trained model, eval source) of a finished run."""
  cfg = read_run_config(run_dir)
  _, eval_src = open_run_data(run_dir, cfg)
  graphdef, state, _ = restore_ranker(cfg, eval_src.schema, run_dir, sharding.make_mesh(1), row_multiple=1)
  return cfg, merge_state(graphdef, state), eval_src


class RealOperands(NamedTuple):
  """The trained model's real GEMM operands: xs {site: [S, R, K]}, ws {site: [K, N]}, dys {site: [S, R, N]}."""
  xs: dict[str, jax.Array]
  ws: dict[str, jax.Array]
  dys: dict[str, jax.Array]
  eval_rows: int
  """real (non-padding) eval rows read, at most the samples x rows asked for"""
  note: str
  """"" when S and R are the samples and rows asked for, else why they are fewer"""


def real_operands(model, eval_src, rows: int, samples: int) -> RealOperands:
  """GEMM inputs, weights, and output gradients of the eval loss of the trained model on its eval
  data, as `samples` samples of `rows` rows. Only real rows enter: the zero-padding rows of a ragged
  final eval batch (weight 0) are dropped. When the eval split has fewer than samples x rows real
  rows, S = as many samples of `rows` rows as it holds, at least 2; below 2 x rows real rows, 2
  samples of half of them (`note` says which). ValueError below 4 real rows (2 samples of 2)."""
  acts: dict[str, list] = {}
  grads: dict[str, list] = {}
  graphdef, state = nnx.split(model)
  capture = jax.jit(lambda state, batch: capture_gemm_operands(
      nnx.merge(graphdef, state), lambda m: weighted_bce(m(batch), batch.labels, batch.weights))[1:])
  n = 0
  for batch in eval_src.eval_batches(rows):
    if n >= rows * samples:
      break
    real = np.asarray(batch.weights) > 0  # padding rows: weight 0, and zeros for features
    a, g = capture(state, jax.tree.map(jnp.asarray, batch))
    for s, x in a.items():
      acts.setdefault(s, []).append(np.asarray(x.astype(jnp.float32))[real])
      grads.setdefault(s, []).append(np.asarray(g[s].astype(jnp.float32))[real])
    n += int(real.sum())
  if n < 4:
    raise ValueError(f"the eval split has {n} real rows; the error model's real operands need at least 4")
  s_used = min(samples, max(2, n // rows))
  r_used = min(rows, n // s_used)
  note = "" if (s_used, r_used) == (samples, rows) else (
      f"the eval split has {n} real rows, fewer than --samples {samples} x --rows {rows}: the real-operands "
      f"column uses {s_used} samples of {r_used} rows")
  cut = lambda v: jnp.asarray(np.concatenate(v)[:s_used * r_used].reshape(s_used, r_used, -1))  # noqa: E731
  return RealOperands({s: cut(v) for s, v in acts.items()},
                      {s: m.kernel[...].astype(jnp.float32) for s, m in dense_modules(model)},
                      {s: cut(v) for s, v in grads.items()}, n, note)


def measure(args: Args, sites, stats: ProbeState, model, eval_src, metric: str = "mere", operands=None) -> dict:
  """{site: {setting: {candidate: {gemm: MereEstimate}}}} for the three operand settings (scored by
  `metric`, one of error_model.METRICS; the plan uses "mere"). `operands`: real_operands(...) of
  an earlier call, to score the same real operands under another metric without recomputing them."""
  op = operands if operands is not None else real_operands(model, eval_src, args.rows, args.samples)
  key = jax.random.key(args.seed)
  out = {}
  with progress(len(sites), "error model") as bar:
    for i, (s, k, n) in enumerate(sites):
      kl, ks, kr = jax.random.split(jax.random.fold_in(key, i), 3)
      common = dict(candidates=args.candidates, num_samples=args.samples, batch=args.rows, metric=metric)
      dy = Gaussian.from_welford(stats.grads[s]) if s in stats.grads else None  # older stats: N(0, 1)
      out[s] = {
          "learned": mere_for_site(kl, Gaussian.from_welford(stats.acts[s]), MatrixNormal.from_ema(stats.weights[s]),
                                   dy, **common),
          "standard": mere_for_site(ks, Gaussian.standard(k), MatrixNormal.standard(k, n), **common),
          "real": mere_on_operands(op.xs[s], op.ws[s], op.dys[s], candidates=args.candidates, key=kr, metric=metric),
      }
      bar.update(1)
  return out


OUTPUTS = ("mere_heatmap.png", "mere_heatmap_real.png", "report.md", "precision_plan.json")
"""what `run` writes into --workdir, in this order: the plan last, so that it is there only when the rest is"""


def run(args: Args) -> dict:
  workdir = Path(args.workdir)
  make_workdir(workdir)
  if args.from_run:
    run_dir = Path(args.from_run)
    stats = check_run(run_dir)  # before anything else: the run may be missing, a logreg one, or lack statistics
    summary_path = run_dir / "summary.json"
    probe_info = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  else:
    run_dir = workdir
    rcfg = RankerConfig(data=args.data, model=args.model, optim=args.optim, train=args.train, probe=args.probe,
                        fresh=args.fresh)
    if args.probe.every == 0 or args.probe.every > args.train.steps:
      raise ValueError(f"--probe.every must be in [1, --train.steps={args.train.steps}] to collect statistics")
  for name in OUTPUTS:  # an earlier probe's: a run interrupted or failing from here on must not leave them beside its own
    (workdir / name).unlink(missing_ok=True)
  if not args.from_run:
    probe_info = train_and_evaluate(rcfg, run_dir)
    stats = check_run(run_dir)
  cfg, model, eval_src = load_run(run_dir)
  sites = gemm_sites(model)
  operands = real_operands(model, eval_src, args.rows, args.samples)
  if operands.note:
    print(f"note: {operands.note}", flush=True)
  mere = measure(args, sites, stats, model, eval_src, operands=operands)

  batch = args.plan_batch or max(1, cfg.data.batch_size // jax.device_count())
  on_gpu = jax.default_backend() == "gpu"
  timings = None
  if on_gpu:
    timings = dispatch.autotune(dispatch.site_shapes(sites, batch=batch), cache_path=args.timing_cache)
  learned = {s: m["learned"] for s, m in mere.items()}
  plan, rows = dispatch.make_plan(sites, learned, batch=batch, timings=timings, bound=args.bound)
  agg = None
  if timings is not None:
    a = dispatch.aggregate(rows, timings, mere=learned, bound=args.bound)
    agg = {"plan_speedup_over_bf16": a.plan_speedup, "best_global": a.best_global,
           "global_speedups": {n: a.global_speedup(n) for n in a.global_us}}
  n_samples, n_rows = next(iter(operands.xs.values())).shape[:2]
  real_info = {"samples": n_samples, "rows": n_rows, "eval_rows": operands.eval_rows, "note": operands.note}
  mere_json = {s: {st: {c: {g: e.as_dict() for g, e in by_g.items()} for c, by_g in m[st].items()} for st in SETTINGS}
               for s, m in mere.items()}
  probe_keys = ("probe_every", "probe_updates", "probe_timed_updates", "probe_seconds", "probe_overhead")
  out = {
      "run": str(run_dir), "device": jax.devices()[0].device_kind, "bound": args.bound, "plan_batch": batch,
      "timed": timings is not None, "plan": plan.to_json(), "rows": [r.as_dict() for r in rows],
      "sites": [{"site": s, "k": k, "n": n} for s, k, n in sites], "mere": mere_json,
      "probe": {k: probe_info.get(k) for k in probe_keys}, "aggregate": agg, "real_operands": real_info,
      "config": config_to_dict(args),
  }
  names = [s for s, _, _ in sites]
  cands = list(args.candidates)
  plot_mere_heatmap(mere_json, names, cands, workdir / "mere_heatmap.png", "learned")
  plot_mere_heatmap(mere_json, names, cands, workdir / "mere_heatmap_real.png", "real",
                    title="MERE per GEMM site and candidate (real eval activations, trained weights)")
  write_report(workdir / "report.md", run=str(run_dir), sites=sites, candidates=cands, mere=mere_json,
               rows=out["rows"], probe=out["probe"], bound=args.bound, timed=out["timed"], aggregate=agg,
               real_operands=real_info)
  (workdir / "precision_plan.json").write_text(json.dumps(out, indent=2) + "\n")  # last: see OUTPUTS
  return out


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.probe", description=__doc__.split("\n\n")[0])
  try:
    out = run(args)
  except (DataFormatError, DataSpecError, WorkdirConflictError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM
    resumes = "" if args.from_run else f" (training resumes from the newest checkpoint in {args.workdir}/checkpoints)"
    print(f"\ninterrupted: no plan was written; run the same command again to go on{resumes}", file=sys.stderr)
    return exit_status(e)
  chosen = {}
  for r in out["rows"]:
    chosen[r["candidate"]] = chosen.get(r["candidate"], 0) + 1
  ov = out["probe"].get("probe_overhead")
  print(f"plan: {len(out['sites'])} sites x 3 GEMMs -> {chosen}; timed: {out['timed']}; probe overhead: "
        + ("n/a" if ov is None else f"{100 * ov:.2f}%"))
  print(f"outputs in {args.workdir}: precision_plan.json, report.md, mere_heatmap.png, mere_heatmap_real.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
