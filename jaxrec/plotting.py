"""Training curves from a metrics JSONL file, drawn to a PNG.

The file holds one JSON object per log event, each with an integer "step" and any subset of:

    train/loss             training loss (drawn raw and smoothed)
    eval/<task>/ne         normalized entropy on the eval split, one line per task
    eval/<task>/oracle_ne  NE of the true probabilities (synthetic data): the floor, dashed
    eval/<task>/auc        ROC AUC on the eval split
    examples_per_sec       training throughput

Panels without data are left out. Drawing uses matplotlib's Agg canvas directly (no pyplot, no display,
no change to the global backend), so it runs on headless machines and inside tests.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

_EVAL_KEY = re.compile(r"^eval/(?P<task>.+)/(?P<metric>ne|oracle_ne|auc)$")
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")

Series = tuple[list[float], list[float]]  # (steps, values)


def _read(path: Path) -> dict[str, Series]:
  """Every numeric key of the file as (steps, values), in file order. Raises ValueError on bad input."""
  series: dict[str, Series] = {}
  rows = 0
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      step = row.get("step")
      if not isinstance(step, (int, float)) or isinstance(step, bool):
        raise ValueError(f"{path}:{lineno}: every line needs a numeric \"step\", got {step!r}")
      rows += 1
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          steps, values = series.setdefault(key, ([], []))
          steps.append(float(step))
          values.append(float(value))
  if rows == 0:
    raise ValueError(f"{path}: no log lines to plot (the file is empty)")
  return series


def _smooth(values: list[float], weight: float) -> list[float]:
  """Debiased exponential moving average (as TensorBoard draws it); NaN and inf are passed over."""
  out, avg, norm = [], 0.0, 0.0
  for v in values:
    if math.isfinite(v):
      avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
    out.append(avg / norm if norm else math.nan)
  return out


def _style(ax, title: str, ylabel: str) -> None:
  ax.set_title(title, fontsize=11)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
  ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def plot_training_curves(metrics_jsonl: Path, out_png: Path, *, title: str = "") -> Path:
  """Draws loss, eval NE (with the oracle NE dashed), eval AUC and throughput against step.

  Returns `out_png` (its folder is created). Raises ValueError when the file is empty, a line is not
  a JSON object with a numeric "step", or no line holds any of the keys above.
  """
  metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
  series = _read(metrics_jsonl)
  evals: dict[str, dict[str, Series]] = {}
  for key, s in series.items():
    if m := _EVAL_KEY.match(key):
      evals.setdefault(m["task"], {})[m["metric"]] = s
  tasks = sorted(evals)
  color = {t: _COLORS[i % len(_COLORS)] for i, t in enumerate(tasks)}
  panels = []
  if "train/loss" in series:
    panels.append("loss")
  if any("ne" in evals[t] or "oracle_ne" in evals[t] for t in tasks):
    panels.append("ne")
  if any("auc" in evals[t] for t in tasks):
    panels.append("auc")
  if "examples_per_sec" in series:
    panels.append("throughput")
  if not panels:
    raise ValueError(f"{metrics_jsonl}: nothing to plot; lines need at least one of train/loss, "
                     "eval/<task>/ne, eval/<task>/oracle_ne, eval/<task>/auc, examples_per_sec")

  ncols = 1 if len(panels) == 1 else 2
  nrows = math.ceil(len(panels) / ncols)
  fig = Figure(figsize=(6.4 * ncols, 4.0 * nrows), dpi=110, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  for ax, panel in zip(axes, panels):
    if panel == "loss":
      steps, values = series["train/loss"]
      if len(values) >= 10:
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1, label="raw")
        ax.plot(steps, _smooth(values, 0.9), color="tab:blue", linewidth=2, label="smoothed (EMA 0.9)")
        ax.legend(loc="upper right", fontsize=9)
      else:  # too few points to smooth
        ax.plot(steps, values, color="tab:blue", marker="o", markersize=3, linewidth=1.5)
      _style(ax, "training loss", "loss")
    elif panel == "ne":
      for t in tasks:
        if "ne" in evals[t]:
          ax.plot(*evals[t]["ne"], color=color[t], marker="o", markersize=3, linewidth=1.5, label=f"{t}")
        if "oracle_ne" in evals[t]:
          # marked: a run with one eval has one point, which a bare dashed line does not draw
          ax.plot(*evals[t]["oracle_ne"], color=color[t], linestyle="--", linewidth=1.2, marker="x", markersize=4,
                  label=f"{t} oracle")
      _style(ax, "eval normalized entropy (lower is better)", "NE")
      ax.legend(fontsize=9)
    elif panel == "auc":
      for t in tasks:
        if "auc" in evals[t]:
          ax.plot(*evals[t]["auc"], color=color[t], marker="o", markersize=3, linewidth=1.5, label=t)
      _style(ax, "eval AUC (higher is better)", "AUC")
      ax.legend(fontsize=9)
    else:
      ax.plot(*series["examples_per_sec"], color="tab:gray", linewidth=1.5)
      ax.yaxis.set_major_formatter(EngFormatter(sep=""))
      ax.set_ylim(bottom=0)
      _style(ax, "throughput", "examples / s")
  first = min(min(steps) for steps, _ in series.values())
  last = max(max(steps) for steps, _ in series.values())
  if last > first:  # one step axis for every panel, so the curves line up
    pad = 0.02 * (last - first)
    for ax in axes[:len(panels)]:
      ax.set_xlim(first - pad, last + pad)
  if title:
    fig.suptitle(title, fontsize=13)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_png)
  return out_png
