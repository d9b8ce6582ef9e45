"""python -m train.bench_precision: LoKA's end-to-end claim: a ranker's training and inference step
under its precision plan, against bf16 and against one global FP8 recipe for every GEMM.

    python -m train.bench_precision --run runs/probe                 # the run train.probe left there
    python -m train.bench_precision --run runs/probe --batch 8192 --steps 30 --out runs/bench_precision

--run DIR is a `python -m train.probe` workdir (the trained run's config.json and checkpoint, and
precision_plan.json). Its model is rebuilt with bf16 compute under each variant:

    bf16                              every GEMM plainly in bf16 (the baseline)
    plan                              DIR/precision_plan.json: Dispatch's choice per GEMM
    fp8_tensor / fp8_row / fp8_block  one recipe for every GEMM (each impl of --impls)
    fp8_delayed                       per-tensor FP8 with delayed scaling everywhere (amax
                                      histories start empty: the first call uses current amaxes)

and timed on the same --batch rows of the run's eval data, already on the device:

    train   the jitted training step (forward, dgrad and wgrad GEMMs, optimizer; state donated)
    infer   the jitted forward + sigmoid, every FP8 weight quantized per call
    serve   the same with every FP8 forward weight quantized once beforehand (Dense.prequantize),
            which is how an inference server holds them (fp8_tensor inputs scaled per row, as
            serve.engine.load_ranker does)

Each time is the median over --repeats loops of --steps steps after two warm-up calls. Every
variant's inference output is checked against bf16 (max |p - p_bf16| and the log-loss change on the
batches, which a wrong kernel would blow up). Prints a table; writes bench_precision.json and
bench_precision.md to --out. On a CPU the FP8 GEMMs are fake quantization (extra work on top of
an f32 GEMM): the table then shows the mechanics, not speeds; LoKA's targets (training >= 1.25x,
inference >= 1.5x over bf16; the plan beating the best global recipe) are GPU measurements.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrec.config import parse_config
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.interrupts import entrypoint
from jaxrec.layers.dense import gemm_sites, prequantize_fp8_weights
from jaxrec.metrics import log_loss
from jaxrec.models import build_model
from jaxrec.precision.plan import GEMMS, PlanError, PrecisionPlan
from jaxrec.progress import progress
from jaxrec.training import sharding
from jaxrec.training.loop import make_workdir, open_run_data
from jaxrec.training.restore import read_run_config, restore_ranker
from jaxrec.training.state import merge_state, plan_train_state
from jaxrec.training.step import batch_shardings, dense_optimizer, make_train_step

GLOBAL_RECIPES = ("fp8_tensor", "fp8_row", "fp8_block", "fp8_delayed")
PHASES = ("train", "infer", "serve")


@dataclasses.dataclass(frozen=True)
class Args:
  run: str = "runs/probe"
  """a train.probe workdir: the trained run (config.json, checkpoint) and its precision_plan.json"""
  plan: str = ""
  """another plan JSON for the 'plan' variant (default: RUN/precision_plan.json)"""
  out: str = "runs/bench_precision"
  """where bench_precision.json and bench_precision.md go"""
  batch: int = 8192
  """rows per step"""
  steps: int = 20
  """steps per timed loop"""
  repeats: int = 3
  """timed loops per variant and phase; the median is reported"""
  impls: tuple[str, ...] = ()
  """impls of the global FP8 recipes (default: xla, and pallas too on a GPU)"""
  variants: tuple[str, ...] = ("bf16", "plan") + GLOBAL_RECIPES
  """which variants to run (bf16 is always run: it is the baseline)"""

  def __post_init__(self):
    if self.batch < 1 or self.steps < 1 or self.repeats < 1:
      raise ValueError(f"--batch, --steps and --repeats must be >= 1, got {self.batch}, {self.steps}, {self.repeats}")
    unknown = sorted(set(self.variants) - {"bf16", "plan", *GLOBAL_RECIPES})
    if unknown:
      raise ValueError(f"unknown --variants {unknown}; choose from bf16, plan, {', '.join(GLOBAL_RECIPES)}")
    bad = sorted(set(self.impls) - {"xla", "pallas"})
    if bad:
      raise ValueError(f"unknown --impls {bad}; choose from xla, pallas")
    if self.plan and "plan" not in self.variants:
      raise ValueError(f"--plan {self.plan} is for the 'plan' variant, which --variants {','.join(self.variants)} "
                       "leaves out")


def variant_plans(args: Args, run_dir: Path) -> dict[str, PrecisionPlan | None]:
  """{variant name: plan} in run order; bf16 first (None: the plain bf16 path)."""
  impls = args.impls or (("xla", "pallas") if jax.default_backend() == "gpu" else ("xla",))
  plans: dict[str, PrecisionPlan | None] = {"bf16": None}
  if "plan" in args.variants:
    path = Path(args.plan) if args.plan else run_dir / "precision_plan.json"
    if not path.exists():
      raise FileNotFoundError(f"no precision plan at {path}: run python -m train.probe --workdir {run_dir} first")
    plans["plan"] = PrecisionPlan.load(path)
  for recipe in GLOBAL_RECIPES:
    if recipe in args.variants:
      for impl in impls:
        plans[f"{recipe}:{impl}"] = PrecisionPlan.uniform(recipe, impl)
  return plans


def check_plans(plans: dict[str, PrecisionPlan | None], sites: list[tuple[str, int, int]], backend: str) -> None:
  """PlanError (a ValueError), before anything is timed, for a variant whose plan names sites (or
  shapes) the model lacks, or runs the Pallas kernels on a backend other than a GPU."""
  for name, plan in plans.items():
    if plan is None:
      continue
    plan.check_backend(backend, f"variant {name}")
    try:
      plan.check_sites(sites)
    except PlanError as e:
      raise PlanError(f"variant {name}: {e}") from None


def _median_step_s(fn, steps: int, repeats: int) -> float:
  fn()
  fn()  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / steps)
  return statistics.median(times)


def _click_log_loss(p: np.ndarray, batch) -> float:
  """Weighted log-loss of the first objective's probabilities p [B, T] on a host batch."""
  return log_loss(np.asarray(batch.labels)[:, 0], p[:, 0], np.asarray(batch.weights))


def run(args: Args) -> dict:
  run_dir = Path(args.run)
  cfg = read_run_config(run_dir, hint="pass --run the workdir of python -m train.probe")
  if cfg.model.kind != "dcnv2":
    raise ValueError(f"the run's model is {cfg.model.kind!r}; precision plans apply to dcnv2 rankers")
  plans = variant_plans(args, run_dir)
  _, eval_src = open_run_data(run_dir, cfg)
  schema = eval_src.schema
  mesh = sharding.make_mesh(1)
  model_cfg = dataclasses.replace(cfg.model, precision_plan="",
                                  dcnv2=dataclasses.replace(cfg.model.dcnv2, compute_dtype="bfloat16"))
  sites = gemm_sites(nnx.eval_shape(lambda: build_model(schema, model_cfg)))
  check_plans(plans, sites, jax.default_backend())  # before the bf16 variant is timed, not after
  _, restored, _ = restore_ranker(cfg, schema, run_dir, mesh, row_multiple=1)
  host = []
  for i, b in enumerate(eval_src.eval_batches(args.batch)):
    host.append(b)
    if i == 2:
      break
  bsh = batch_shardings(mesh, with_truth=host[0].true_prob is not None)
  batches = [jax.device_put(b, bsh) for b in host]
  tx = dense_optimizer(cfg.optim)
  results: dict[str, dict] = {}
  probs_bf16 = ll_bf16 = None
  with progress(len(plans) * len(PHASES), "bench_precision") as bar:
    for name, plan in plans.items():
      model_fn = lambda plan=plan: build_model(schema, model_cfg, plan=plan)  # noqa: E731
      graphdef, _, abstract, state_sh = plan_train_state(model_fn, tx, mesh)
      # the trained values; this variant's own (empty) amax histories where it has fp8_delayed sites
      start = restored.replace(fp8=jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract.fp8))
      step = make_train_step(graphdef, tx, cfg.optim, state_sh, bsh)
      holder = {"state": jax.tree.map(jnp.copy, start), "i": 0}

      def train_once(step=step, holder=holder):
        holder["state"], m = step(holder["state"], batches[holder["i"] % len(batches)])
        holder["i"] += 1
        return m["loss"]

      row = {"train_ms": 1e3 * _median_step_s(train_once, args.steps, args.repeats)}
      bar.update(1)
      for phase in ("infer", "serve"):
        model = merge_state(graphdef, start)
        quantized = prequantize_fp8_weights(model, rowwise_inputs=True) if phase == "serve" else []
        g, st = nnx.split(model)
        fwd = jax.jit(lambda st, b, g=g: jax.nn.sigmoid(nnx.merge(g, st)(b)))
        counter = {"i": 0}

        def infer_once(fwd=fwd, st=st, counter=counter):
          counter["i"] += 1
          return fwd(st, batches[counter["i"] % len(batches)])

        row[f"{phase}_ms"] = 1e3 * _median_step_s(infer_once, args.steps, args.repeats)
        if phase == "serve":
          row["prequantized_sites"] = len(quantized)
          probs = [np.asarray(fwd(st, b), np.float32) for b in batches]
          ll = float(np.mean([_click_log_loss(p, b) for p, b in zip(probs, host)]))
          if probs_bf16 is None:  # the first variant is bf16, the baseline
            probs_bf16, ll_bf16 = probs, ll
          row["max_abs_dp"] = float(max(np.max(np.abs(p - q)) for p, q in zip(probs, probs_bf16)))
          row["logloss"] = ll
          row["logloss_change_vs_bf16"] = ll / ll_bf16 - 1.0
        bar.update(1)
      if plan is not None:
        counts: dict[str, int] = {}
        for s, _, _ in sites:
          for gemm in GEMMS:
            c = plan.site(s).gemm(gemm)
            key = c.numerics if not c.is_fp8 else f"{c.numerics}:{c.impl}"
            counts[key] = counts.get(key, 0) + 1
        row["gemms"] = counts
      results[name] = row
  base = results["bf16"]
  for row in results.values():
    for phase in PHASES:
      row[f"{phase}_speedup"] = base[f"{phase}_ms"] / row[f"{phase}_ms"]
  globals_ = [n for n in results if n.split(":")[0] in GLOBAL_RECIPES]
  summary = {}
  if "plan" in results and globals_:
    for phase in PHASES:
      best = min(globals_, key=lambda n: results[n][f"{phase}_ms"])
      summary[phase] = {"best_global": best, "plan_over_best_global": results[best][f"{phase}_ms"]
                        / results["plan"][f"{phase}_ms"]}
  return {"run": str(run_dir), "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
          "sites": [{"site": s, "k": k, "n": n} for s, k, n in sites],
          "variants": results, "plan_vs_best_global": summary}


def format_table(out: dict) -> str:
  lines = [f"device {out['device']} ({out['backend']}), batch {out['batch']}, median of {out['repeats']} x "
           f"{out['steps']} steps; run {out['run']}", "",
           "| variant | train ms | x bf16 | infer ms | x bf16 | serve ms (weights pre-quantized) | x bf16 "
           "| max abs dp vs bf16 | log-loss change vs bf16 |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in out["variants"].items():
    lines.append(f"| {name} | {r['train_ms']:.3f} | {r['train_speedup']:.3f} | {r['infer_ms']:.3f} | "
                 f"{r['infer_speedup']:.3f} | {r['serve_ms']:.3f} | {r['serve_speedup']:.3f} | "
                 f"{r['max_abs_dp']:.2e} | {100 * r['logloss_change_vs_bf16']:+.3f}% |")
  if out["plan_vs_best_global"]:
    lines.append("")
    for phase, s in out["plan_vs_best_global"].items():
      lines.append(f"{phase}: plan vs the best global recipe ({s['best_global']}): {s['plan_over_best_global']:.3f}x")
  if out["backend"] != "gpu":
    lines += ["", "Not a GPU: FP8 here is fake quantization on top of f32 GEMMs, so these times are not "
              "FP8 speeds (LoKA's targets are H100 measurements)."]
  return "\n".join(lines)


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.bench_precision", description=__doc__.split("\n\n")[0])
  dest = Path(args.out)
  try:
    make_workdir(dest)  # before minutes of timing, not after
    out = run(args)
  except (DataFormatError, DataSpecError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table = format_table(out)
  (dest / "bench_precision.json").write_text(json.dumps(out, indent=2) + "\n")
  (dest / "bench_precision.md").write_text("# bench_precision\n\n" + table + "\n")
  print(table)
  print(f"outputs in {dest}: bench_precision.json, bench_precision.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
