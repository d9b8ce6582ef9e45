"""The Probe's outputs: MERE tables per GEMM site, the heatmap PNG and report.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxrec.precision.plan import GEMMS

SETTINGS = ("learned", "standard", "real")
"""learned: operands sampled from the Probe's statistics (activations, weights, output gradients);
standard: N(0, 1) operands of the same shapes; real: the trained model's own eval activations,
weights and eval-loss output gradients"""


def colour_range(mere: dict, sites: list[str], candidates: list[str]) -> tuple[float, float]:
  """(vmin, vmax) of log10 MERE over every setting of these sites and candidates, zeros left out."""
  every = np.array([mere[s][x][c][g]["mean"] for s in sites for x in mere[s] for c in candidates for g in GEMMS])
  positive = every[every > 0]
  return (float(np.log10(positive.min())), float(np.log10(positive.max()))) if positive.size else (-6.0, 0.0)


def plot_mere_heatmap(mere: dict, sites: list[str], candidates: list[str], out_png: Path,
                      setting: str = "learned", title: str = "") -> Path:
  """One panel per GEMM (fwd, dgrad, wgrad): sites x candidates, colour = log10 MERE, annotated.

  The colour scale spans every setting in `mere` (learned, standard, real), so the heatmaps of two
  settings compare by colour; a MERE of 0 (the f32 reference itself) is left grey, not pinned to a
  floor that would squeeze every other cell into one colour."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(GEMMS), figsize=(4.2 * len(GEMMS), 0.5 * len(sites) + 2.0), squeeze=False)
  vals = np.array([[[mere[s][setting][c][g]["mean"] for c in candidates] for s in sites] for g in GEMMS])
  vmin, vmax = colour_range(mere, sites, candidates)
  logv = np.ma.log10(np.ma.masked_less_equal(vals, 0.0))
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
  for ax, g, grid, lg in zip(axes[0], GEMMS, vals, logv):
    im = ax.imshow(lg, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(candidates)), candidates, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(sites)), sites if g == GEMMS[0] else [""] * len(sites), fontsize=8)
    ax.set_title(g)
    for i in range(len(sites)):
      for j in range(len(candidates)):
        dark = lg[i, j] is not np.ma.masked and lg[i, j] < (vmin + vmax) / 2
        ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
  fig.colorbar(im, ax=axes[0].tolist(), label="log10 MERE (one scale for every setting)", shrink=0.8)
  fig.suptitle(title or f"MERE per GEMM site and candidate ({setting} operands)", y=1.0 + 0.25 / fig.get_figheight())
  out_png = Path(out_png)
  fig.savefig(out_png, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return out_png


def _fmt(e: dict) -> str:
  return f"{e['mean']:.4f} [{e['low']:.4f}, {e['high']:.4f}]"


def write_report(path: Path, *, run: str, sites: list[tuple[str, int, int]], candidates: list[str], mere: dict,
                 rows: list[dict], probe: dict, bound: float, timed: bool, aggregate: dict | None,
                 real_operands: dict | None = None) -> Path:
  """report.md: the plan per site and GEMM, MERE learned vs N(0, 1) vs real per GEMM, the Probe's overhead.
  real_operands: {"samples", "rows", "eval_rows", "note"} of the real operands (train.probe.RealOperands)."""
  lines = [f"# Precision plan for {run}", ""]
  ov, secs = probe.get("probe_overhead"), probe.get("probe_seconds")  # None: a run without summary.json
  lines += [f"Probe: every {probe.get('probe_every')} steps, {probe.get('probe_updates')} updates, "
            + ("time not recorded" if secs is None else f"{secs:.2f} s") + f" timed over "
            f"{probe.get('probe_timed_updates')} updates, overhead "
            + ("not measured" if ov is None else f"{100 * ov:.2f}% of training step time") + ".", ""]
  lines += [f"Rule (jaxrec.precision.dispatch): MERE upper 95% bound < {bound} and, when timed, speedup over "
            f"XLA bf16 > 1.05, fastest wins; else bf16. Timings: {'measured on this device' if timed else 'not timed (no GPU)'}.", ""]
  if real_operands:
    ro = real_operands
    lines += [f"Real operands: {ro['samples']} samples of {ro['rows']} eval rows each, padding rows left out"
              + (f". Note: {ro['note']}" if ro["note"] else "") + ".", ""]
  lines += ["## Plan", "", "| site | K | N | GEMM | choice | MERE [95% CI] | speedup | reason |", "|---|---|---|---|---|---|---|---|"]
  kn = {n: (k, nn) for n, k, nn in sites}
  for r in rows:
    k, n = kn[r["site"]]
    m = r.get("mere")
    lines.append(f"| {r['site']} | {k} | {n} | {r['gemm']} | {r['candidate']} | {_fmt(m) if m else '-'} | "
                 f"{r['speedup']} | {r.get('reason', '')} |")
  for g in GEMMS:
    lines += ["", f"## MERE: learned statistics vs N(0, 1) vs real operands ({g} GEMM)", "",
              "| site | candidate | learned | N(0, 1) | real | learned / N(0,1) | learned closer to real than N(0,1) |",
              "|---|---|---|---|---|---|---|"]
    for s, _, _ in sites:
      for c in candidates:
        le, st, re = (mere[s][x][c][g]["mean"] for x in SETTINGS)
        ratio = f"{le / st:.2f}" if st > 0 else "-"  # "f32" is the reference itself: MERE 0
        lines.append(f"| {s} | {c} | {le:.4f} | {st:.4f} | {re:.4f} | {ratio} | {abs(le - re) < abs(st - re)} |")
  if aggregate:
    lines += ["", "## Aggregate GEMM time (training step: fwd + dgrad + wgrad)", "", "```", str(aggregate), "```"]
  path = Path(path)
  path.write_text("\n".join(lines) + "\n")
  return path
