"""python -m train.mere_study: LoKA claim 1 under several error metrics, on one or more probed runs.

For every GEMM site of each run (a workdir that `python -m train.probe` or `train.ranker
--probe.every N` left, with probe_stats.npz), scores each candidate's forward GEMM on three kinds
of operands, as `train.probe` does: sampled from the Probe-learned statistics, N(0, 1) of the same
shapes, and the trained model's real eval activations, weights and output gradients. The forward
GEMM by default; --gemms fwd,dgrad,wgrad adds the gradient GEMMs (their dy operand: learned from
the Probe's output-gradient statistics, N(0, 1), or the eval loss's real gradient). Does it under each metric of
`jaxrec.precision.error_model.METRICS` (the plan's MERE, LoKA's per-element mean, and its median),
because LoKA's claim ("learned > N(0, 1), and closer to real") should not hinge on the normalisation.

    python -m train.mere_study --runs /tmp/probe_mods,/tmp/probe_base --out runs/mere_study

Writes mere_study.json (every estimate) and mere_study.md (one summary row per run, metric and GEMM:
geometric mean of learned / N(0, 1) and real / N(0, 1), how many (site, candidate) pairs have
learned > N(0, 1), real > N(0, 1), both, and how many have learned closer to real than N(0, 1) is)
to --out.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from jaxrec.config import parse_config
from jaxrec.interrupts import entrypoint
from jaxrec.layers.dense import gemm_sites
from jaxrec.precision.error_model import GEMMS, METRICS
from jaxrec.precision.probe import ProbeState
from jaxrec.training.loop import make_workdir
from train import probe as probe_entry


@dataclasses.dataclass(frozen=True)
class Args:
  runs: tuple[str, ...] = ()
  """probed run workdirs (each with config.json, a checkpoint and probe_stats.npz), comma-separated"""
  out: str = "runs/mere_study"
  """where mere_study.json and mere_study.md go"""
  metrics: tuple[str, ...] = tuple(METRICS)
  """error metrics to score with (jaxrec.precision.error_model.METRICS)"""
  gemms: tuple[str, ...] = ("fwd",)
  """which GEMMs of each site to summarise: fwd, dgrad, wgrad"""
  candidates: tuple[str, ...] = ("bf16", "fp8_tensor", "fp8_row", "fp8_block")
  samples: int = 16
  """operand samples per site and setting"""
  rows: int = 256
  """rows per sampled activation batch"""
  seed: int = 0

  def __post_init__(self):
    if not self.runs:
      raise ValueError("pass --runs DIR[,DIR...]: workdirs of probed runs (python -m train.probe leaves one)")
    if not self.metrics:
      raise ValueError(f"--metrics is empty: choose one or more of {', '.join(METRICS)}")
    bad = [m for m in self.metrics if m not in METRICS]
    if bad:
      raise ValueError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
    bad = [g for g in self.gemms if g not in GEMMS]
    if bad or not self.gemms:
      raise ValueError(f"--gemms: choose one or more of {', '.join(GEMMS)}, got {list(self.gemms)}")
    probe_entry.check_sampling(self.candidates, self.samples, self.rows)


def summarise(table: list[dict]) -> dict:
  """Claim-1 summary of rows {learned, standard, real} (MERE means of one GEMM) over the rows whose
  N(0, 1) MERE is not 0 (the "f32" candidate is the reference itself): every count is "of `pairs`"."""
  scored = [r for r in table if r["standard"] > 0]
  lr = np.array([r["learned"] / r["standard"] for r in scored])
  rr = np.array([r["real"] / r["standard"] for r in scored])
  geo = lambda x: float(np.exp(np.log(x).mean())) if x.size else float("nan")  # noqa: E731
  closer = sum(abs(r["learned"] - r["real"]) < abs(r["standard"] - r["real"]) for r in scored)
  return {"pairs": len(scored), "geo_learned_over_standard": geo(lr), "geo_real_over_standard": geo(rr),
          "learned_above_standard": int((lr > 1).sum()), "real_above_standard": int((rr > 1).sum()),
          "both_above_standard": int(((lr > 1) & (rr > 1)).sum()), "learned_closer_to_real": int(closer)}


def study_run(args: Args, run_dir: Path, stats: ProbeState) -> dict:
  """One run's estimates; `stats`: its statistics, as probe_entry.check_run returned them."""
  _, model, eval_src = probe_entry.load_run(run_dir)
  sites = gemm_sites(model)
  pargs = probe_entry.Args(from_run=str(run_dir), candidates=args.candidates, samples=args.samples, rows=args.rows,
                           seed=args.seed)
  out = {}
  operands = probe_entry.real_operands(model, eval_src, args.rows, args.samples)  # once for every metric
  if operands.note:
    print(f"note: {run_dir}: {operands.note}", flush=True)
  for metric in args.metrics:
    m = probe_entry.measure(pargs, sites, stats, model, eval_src, metric=metric, operands=operands)
    out[metric] = {}
    for g in args.gemms:
      table = [{"site": s, "candidate": c, **{st: m[s][st][c][g].mean for st in ("learned", "standard", "real")}}
               for s, _, _ in sites for c in args.candidates]
      out[metric][g] = {"table": table, "summary": summarise(table)}
  return {"dy_probed": bool(stats.grads), "real_operands_note": operands.note, "metrics": out}


def run(args: Args) -> dict:
  outdir = Path(args.out)
  make_workdir(outdir)  # before minutes of error-model sampling, not after
  stats = {r: probe_entry.check_run(Path(r)) for r in args.runs}  # every run, before minutes of work on the first
  results = {r: study_run(args, Path(r), stats[r]) for r in args.runs}
  (outdir / "mere_study.json").write_text(json.dumps({"config": dataclasses.asdict(args), "runs": results},
                                                     indent=2) + "\n")
  lines = ["| run | metric | GEMM | learned / N(0,1) (geo-mean) | real / N(0,1) (geo-mean) | learned > N(0,1) | "
           "real > N(0,1) | both | learned closer to real |", "|---|---|---|---|---|---|---|---|---|"]
  for r, res in results.items():
    for metric, by_gemm in res["metrics"].items():
      for g, v in by_gemm.items():
        s = v["summary"]
        dy_note = "" if g == "fwd" or res["dy_probed"] else " (dy not probed: N(0,1))"
        lines.append(f"| {r} | {metric} | {g}{dy_note} | {s['geo_learned_over_standard']:.3f} | "
                     f"{s['geo_real_over_standard']:.3f} | {s['learned_above_standard']} of {s['pairs']} | "
                     f"{s['real_above_standard']} | {s['both_above_standard']} | "
                     f"{s['learned_closer_to_real']} of {s['pairs']} |")
  notes = [f"Note: {r}: {res['real_operands_note']}." for r, res in results.items() if res["real_operands_note"]]
  (outdir / "mere_study.md").write_text("\n".join(lines + ([""] + notes if notes else [])) + "\n")
  return results


@entrypoint
def main(argv: list[str] | None = None) -> int:
  args = parse_config(Args, argv, prog="python -m train.mere_study", description=__doc__.split("\n\n")[0])
  try:
    run(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print((Path(args.out) / "mere_study.md").read_text())
  return 0


if __name__ == "__main__":
  sys.exit(main())
