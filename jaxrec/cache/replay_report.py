"""replay.md and the PNGs of the ERCache replay study (`jaxrec.cache.replay_study`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_COLORS = {"adsworld": "tab:blue", "taobao": "tab:orange", "movielens": "tab:green"}


def _ttl_runs(runs: dict, soap: bool = False) -> list[tuple[int, dict]]:
  return sorted(((r["policy"]["direct_ttl_s"], r) for r in runs.values()
                 if r["policy"]["failure_rate"] == 0 and r["policy"].get("soap", False) == soap),
                key=lambda x: x[0])


def _fail_runs(runs: dict) -> list[dict]:
  return [r for r in runs.values() if r["policy"]["failure_rate"] > 0]


def _ne(run: dict, task: str) -> float:
  return run.get("metrics", {}).get(f"{task}/ne", math.nan)


def _pct(x: float) -> str:
  return "-" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _rel(x: float, ref: float) -> str:
  return "-" if not (math.isfinite(x) and math.isfinite(ref)) else f"{100 * (x / ref - 1):+.3f}%"


def markdown(results: dict, cfg) -> str:
  lines = [f"# ERCache replay ({results['date']})", "",
           f"Warm-up {cfg.warmup_s} s of traffic before counting; failover TTL {cfg.failover_ttl_s} s; "
           f"stabilization m = {cfg.stabilize_m}; failures seeded with seed {cfg.seed}. "
           "Inferences saved = requests served from the direct tier (no user-model inference). "
           "Served age: seconds since the embedding a request got was computed (fallbacks excluded).", ""]
  for source, res in results["sources"].items():
    runs = res["runs"]
    tasks = [k[:-3] for k in next(iter(runs.values())).get("metrics", {}) if k.endswith("/ne")]
    head = f"## {source}: {res['measured_requests']} measured requests of {res['requests']}"
    if source == "adsworld":
      head += f" (stream {cfg.stream!r})"
    if "measured_rows" in res:
      head += f", {res['measured_rows']} candidate rows scored"
    lines += [head, ""]
    if "ranker" in res:
      lines += [f"Ranker `{res['ranker']}`, user model `{res['user_model']}`.", ""]
    proc = res.get("request_process")
    if proc:
      vals = proc["values"]
      desc = ", ".join(f"{k} {vals[k]:g}" + (" (changed for this replay)" if k in proc["changed"] else "")
                       for k in vals)
      lines += [f"Request process: {desc}.", ""]
    gaps = res["consecutive_within"]
    lines += [f"A user's consecutive requests within 60 s: {_pct(gaps['60'])}, within 600 s: {_pct(gaps['600'])} "
              "(the gaps ending at a measured request).", ""]
    ttl = _ttl_runs(runs)
    ref = ttl[0][1]
    cols = ["direct TTL (s)", "inferences saved"]
    for t in tasks:
      cols += [f"{t} NE", f"{t} NE vs TTL 0"]
    cols += ["served age p50 / p90 / p99 (s)"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t_s, r in ttl:
      row = [str(t_s), _pct(r["inferences_saved"])]
      for t in tasks:
        row += [f"{_ne(r, t):.5f}", _rel(_ne(r, t), _ne(ref, t))]
      a = r["served_age"]
      row += [f"{a['p50']:.0f} / {a['p90']:.0f} / {a['p99']:.0f}"]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    soap = _ttl_runs(runs, soap=True)
    if soap:
      cols = ["SOAP, direct TTL (s)", "inferences (refreshes)", "served stale (failover tier)", "fallbacks"]
      cols += [f"{t} NE vs sync TTL 0" for t in tasks] + ["served age p50 / p90 / p99 (s)"]
      lines += ["SOAP (the request never waits for the user model: it is served the newest cached embedding, "
                "and the inference it triggers is written back for the user's later requests):", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
      for t_s, r in soap:
        a = r["served_age"]
        row = [str(t_s), str(r["inferences"]), str(r["failover"]), str(r["fallback"])]
        row += [_rel(_ne(r, t), _ne(ref, t)) for t in tasks]
        row += [f"{a['p50']:.0f} / {a['p90']:.0f} / {a['p99']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
      lines.append("")
    if "no_user_model_metrics" in res:
      z = res["no_user_model_metrics"]
      lines += ["Every request given the fallback embedding instead (as if there were no user model): " +
                ", ".join(f"{t} NE {z[f'{t}/ne']:.5f} ({_rel(z[f'{t}/ne'], _ne(ref, t))})" for t in tasks), ""]
    fails = _fail_runs(runs)
    if fails:
      cols = ["failure rate", "failover tier", "failed inferences", "served stale (failover)", "fallbacks"]
      cols += [f"{t} NE vs no failures" for t in tasks]
      lines += [f"Injected user-model failures at direct TTL {cfg.headline_ttl_s} s:", "",
                "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
      clean = dict(ttl).get(cfg.headline_ttl_s, ref)
      for r in fails:
        p = r["policy"]
        row = [f"{100 * p['failure_rate']:g}%", "on" if p["failover"] else "off", str(r["failed_inferences"]),
               str(r["failover"]), str(r["fallback"])]
        row += [_rel(_ne(r, t), _ne(clean, t)) for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
      lines.append("")
      for rate in sorted({r["policy"]["failure_rate"] for r in fails}):
        off = next(r for r in fails if r["policy"]["failure_rate"] == rate and not r["policy"]["failover"])
        on = next(r for r in fails if r["policy"]["failure_rate"] == rate and r["policy"]["failover"])
        ratio = off["fallback"] / on["fallback"] if on["fallback"] else math.inf
        lines.append(f"- {100 * rate:g}% failures: the failover tier cuts fallbacks {off['fallback']} -> "
                     f"{on['fallback']} ({ratio:.1f}x fewer)")
      lines.append("")
  for source, why in results["skipped"].items():
    lines += [f"{source}: skipped ({why})", ""]
  lines.append(f"Took {results['seconds']:.0f} s.")
  return "\n".join(lines) + "\n"


def _save(fig: Figure, path: Path) -> None:
  FigureCanvasAgg(fig)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plots(results: dict, cfg, wd: Path) -> list[Path]:
  """replay_ttl.png (inferences saved and NE change vs TTL), replay_staleness.png (served-age CDFs),
  replay_failover.png (fallbacks with and without the failover tier)."""
  srcs = results["sources"]
  if not srcs:
    return []
  out = []
  fig = Figure(figsize=(11, 4))
  ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for source, res in srcs.items():
    ttl = _ttl_runs(res["runs"])
    x = [max(t, 1) for t, _ in ttl]
    ax.plot(x, [100 * r["inferences_saved"] for _, r in ttl], "o-", color=_COLORS[source], label=source)
    ref = ttl[0][1]
    for task, style in (("click", "o-"), ("conversion", "s--")):
      y = [100 * (_ne(r, task) / _ne(ref, task) - 1) for _, r in ttl]
      if all(math.isfinite(v) for v in y):
        ax2.plot(x, y, style, color=_COLORS[source], label=f"{source} {task}")
  ax.axvline(max(cfg.headline_ttl_s, 1), color="grey", ls=":")
  ax.axhline(50, color="grey", ls=":")
  ax.set(xscale="log", xlabel="direct TTL (s; 0 drawn at 1)", ylabel="user-model inferences saved (%)",
         title="Inferences saved vs direct TTL")
  ax2.axhline(0.1, color="tab:red", ls=":", label="+0.1% budget")
  ax2.set(xscale="log", xlabel="direct TTL (s; 0 drawn at 1)", ylabel="NE change vs TTL 0 (%)",
          title="Downstream NE vs direct TTL")
  for a in (ax, ax2):
    a.grid(True, alpha=0.3)
    a.legend(fontsize=8)
  _save(fig, wd / "replay_ttl.png")
  out.append(wd / "replay_ttl.png")

  fig = Figure(figsize=(5.5 * len(srcs), 4))
  for i, (source, res) in enumerate(srcs.items()):
    ax = fig.add_subplot(1, len(srcs), i + 1)
    for t, r in _ttl_runs(res["runs"]):
      h = r["ages"]
      counts = np.asarray(h["counts"], float)
      if t == 0 or counts.sum() == 0:
        continue
      # exact at every edge: the share of requests served an embedding younger than it (the edges are
      # fine and hold every swept TTL; between two edges the line interpolates)
      younger = np.cumsum(counts)[:-1] / counts.sum()
      ax.plot(np.asarray(h["edges_s"][1:], float), younger, label=f"TTL {t} s")
    ax.set(xscale="log", xlabel="served embedding age (s)", ylabel="share of requests served younger than age",
           title=f"{source}: staleness", ylim=(0, 1.02), xlim=(1, 2 * max(cfg.ttls_s)))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  _save(fig, wd / "replay_staleness.png")
  out.append(wd / "replay_staleness.png")

  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot(1, 1, 1)
  labels, off_v, on_v = [], [], []
  for source, res in srcs.items():
    fails = _fail_runs(res["runs"])
    for rate in sorted({r["policy"]["failure_rate"] for r in fails}):
      pick = {r["policy"]["failover"]: r["fallback"] for r in fails if r["policy"]["failure_rate"] == rate}
      labels.append(f"{source}\n{100 * rate:g}% fail")
      off_v.append(pick[False])
      on_v.append(pick[True])
  x = np.arange(len(labels))
  # a log axis cannot show 0: such bars are drawn at 0.5, and every bar is labelled with its count
  for dx, vals, label, color in ((-0.2, off_v, "no failover tier", "tab:red"), (0.2, on_v, "failover tier", "tab:green")):
    bars = ax.bar(x + dx, np.maximum(vals, 0.5), 0.4, label=label, color=color)
    if vals:  # (no failure runs: an empty chart)
      ax.bar_label(bars, labels=[f"{v:,}" for v in vals], fontsize=7)
  ax.set_xticks(x, labels, fontsize=8)
  ax.set(yscale="log", ylabel="requests served the fallback", title=f"Fallbacks at direct TTL {cfg.headline_ttl_s} s")
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  _save(fig, wd / "replay_failover.png")
  out.append(wd / "replay_failover.png")
  return out
