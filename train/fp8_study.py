"""python -m train.fp8_study: does FP8 cost quality, and does LoKA's plan on the Mods ranker avoid it?

Four ads-world training runs with the same seeds, data and steps (in bf16 compute):

    baseline        bias, LayerNorm, SiLU                        bf16 everywhere
    baseline_fp8    the same model                               FP8 everywhere (--fp8 numerics, all GEMMs)
    mods            NoBias, BlockNorm, HardSwish (LoKA's Mods)   bf16 everywhere
    mods_plan       the Mods model                               the Probe's precision plan

The plan comes from `--plan PATH` (a precision_plan.json of `python -m train.probe` on the same
Mods model), else `python -m train.probe` runs first into WORKDIR/probe (its own training steps
and Probe cadence; this study's --data, --optim and --seed). Writes fp8_study.json and
fp8_study.md (eval NE, relative NE change against the bf16 run of the same model, AUC,
examples/s) to --workdir. On CPU the FP8 GEMMs are XLA's fake-quant numerics (the same values the
Pallas kernels compute), so the quality comparison holds; the speed figures do not (GPU only).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax

from jaxrec.config import parse_config
from jaxrec.data.errors import DataFormatError, DataSpecError
from jaxrec.data.sources import DataConfig
from jaxrec.interrupts import entrypoint
from jaxrec.models import DCNv2Config, ModelConfig, parse_precision_plan
from jaxrec.precision.plan import PrecisionPlan
from jaxrec.training.loop import LoopConfig, RankerConfig, WorkdirConflictError, make_workdir, train_and_evaluate
from jaxrec.training.step import OptimConfig
from train import probe as probe_entry

BASELINE = DCNv2Config(use_bias=True, norm="layer", activation="silu", top_mlp=(256, 256), compute_dtype="bfloat16")
MODS = dataclasses.replace(probe_entry.MODS, compute_dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Args:
  workdir: str = "runs/fp8_study"
  plan: str = ""
  """precision_plan.json for the Mods model; empty = run python -m train.probe into WORKDIR/probe first"""
  fp8: str = "fp8_tensor"
  """numerics of the FP8-everywhere baseline run (fp8_tensor, fp8_row, fp8_block, or fp8_delayed:
  per-tensor with TransformerEngine-style delayed scaling)"""
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: LoopConfig = LoopConfig(steps=3000, log_every=300, eval_every=0, checkpoint_every=3000)
  seed: int = 0
  """model initialisation seed (the data streams are seeded by --data.*)"""
  fresh: bool = False

  def __post_init__(self):
    try:  # uniform:NUMERICS[:IMPL] is how runs() hands --fp8 to the baseline_fp8 model
      ok = self.fp8.startswith("fp8_") and parse_precision_plan(f"uniform:{self.fp8}") is not None
    except ValueError:
      ok = False
    if not ok:
      raise ValueError("--fp8 must be an FP8 numerics (fp8_tensor, fp8_row, fp8_block, fp8_delayed), optionally "
                       f"with :xla or :pallas, got {self.fp8!r}")


def check_plans(args: Args, backend: str) -> None:
  """ValueError, before any training, for a --fp8 or --plan that cannot run here: a plan file that
  does not load, or the Pallas kernels (an impl of pallas) on a backend other than a GPU."""
  plans = {f"--fp8 {args.fp8}": parse_precision_plan(f"uniform:{args.fp8}")}
  if args.plan:
    plans[f"--plan {args.plan}"] = PrecisionPlan.load(args.plan)
  for given, plan in plans.items():
    plan.check_backend(backend, given)


def runs(args: Args, plan_path: str) -> dict[str, ModelConfig]:
  return {
      "baseline": ModelConfig(dcnv2=BASELINE, seed=args.seed),
      "baseline_fp8": ModelConfig(dcnv2=BASELINE, seed=args.seed, precision_plan=f"uniform:{args.fp8}"),
      "mods": ModelConfig(dcnv2=MODS, seed=args.seed),
      "mods_plan": ModelConfig(dcnv2=MODS, seed=args.seed, precision_plan=plan_path),
  }


def _rate(examples_per_sec: float | None) -> str:
  """None where the run's process timed no steps (resumed with at most one left, or already finished)."""
  return "-" if examples_per_sec is None else f"{examples_per_sec:,.0f}"


def run(args: Args) -> dict:
  wd = Path(args.workdir)
  make_workdir(wd)
  check_plans(args, jax.default_backend())  # before the first of four trainings, not at the second
  plan_path = args.plan
  if not plan_path:
    pdir = wd / "probe"
    # the study's data, optimizer and seed: the plan must come from the Mods model the study trains
    probe_entry.run(probe_entry.Args(workdir=str(pdir), data=args.data, optim=args.optim, fresh=args.fresh,
                                     model=ModelConfig(dcnv2=probe_entry.MODS, seed=args.seed)))
    plan_path = str(pdir / "precision_plan.json")
  if not Path(plan_path).exists():
    raise FileNotFoundError(f"no precision plan at {plan_path}")
  results = {}
  for name, model in runs(args, plan_path).items():
    print(f"== {name}: {model.precision_plan or 'bf16 everywhere'}", flush=True)
    cfg = RankerConfig(data=args.data, model=model, optim=args.optim, train=args.train, fresh=args.fresh)
    s = train_and_evaluate(cfg, wd / name)
    results[name] = {k: s[k] for k in ("eval_ne", "eval_auc", "ne_over_oracle", "examples_per_sec", "steps")}
  for model, ref in (("baseline_fp8", "baseline"), ("mods_plan", "mods")):
    results[model]["ne_change_vs_bf16"] = results[model]["eval_ne"] / results[ref]["eval_ne"] - 1.0
  out = {"plan": plan_path, "fp8": args.fp8, "device": jax.devices()[0].device_kind, "results": results}
  (wd / "fp8_study.json").write_text(json.dumps(out, indent=2) + "\n")
  lines = ["| run | model | precision | eval NE | NE change vs its bf16 run | AUC | examples/s |",
           "|---|---|---|---|---|---|---|"]
  desc = {"baseline": ("bias, LayerNorm, SiLU", "bf16"), "baseline_fp8": ("bias, LayerNorm, SiLU", args.fp8 + " everywhere"),
          "mods": ("NoBias, BlockNorm, HardSwish", "bf16"), "mods_plan": ("NoBias, BlockNorm, HardSwish", "Probe plan")}
  for name, r in results.items():
    ch = r.get("ne_change_vs_bf16")
    lines.append(f"| {name} | {desc[name][0]} | {desc[name][1]} | {r['eval_ne']:.5f} | "
                 f"{'-' if ch is None else f'{100 * ch:+.3f}%'} | {r['eval_auc']:.4f} | "
                 f"{_rate(r['examples_per_sec'])} |")
  (wd / "fp8_study.md").write_text("\n".join(lines) + "\n")
  return out


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.fp8_study", description=__doc__.split("\n\n")[0])
  try:
    run(args)
  except (DataFormatError, DataSpecError, WorkdirConflictError, FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print((Path(args.workdir) / "fp8_study.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
