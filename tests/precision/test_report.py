"""report.md of train.probe: written for every run train.probe accepts."""

from jaxrec.precision.error_model import GEMMS
import pytest

from jaxrec.precision.report import SETTINGS, colour_range, plot_mere_heatmap, write_report

PROBE_KEYS = ("probe_every", "probe_updates", "probe_timed_updates", "probe_seconds", "probe_overhead")


def _mere(values: dict[str, float]) -> dict:
  e = lambda v: {"mean": v, "low": v, "high": v, "confidence": 0.95, "samples": 2}  # noqa: E731
  return {"s": {st: {c: {g: e(v) for g in GEMMS} for c, v in values.items()} for st in SETTINGS}}


def test_report_of_a_run_without_summary_and_with_the_f32_candidate(tmp_path):
  """--from_run of a run killed after a checkpoint (no summary.json: every probe field None) raised
  TypeError on the probe time; --candidates f32,... (MERE exactly 0 on N(0, 1)) ZeroDivisionError."""
  rows = [{"site": "s", "gemm": g, "candidate": "xla_bf16", "speedup": "not timed", "reason": "r",
           "mere": {"mean": 0.002, "low": 0.001, "high": 0.003}} for g in GEMMS]
  path = write_report(tmp_path / "report.md", run="r", sites=[("s", 8, 4)], candidates=["f32", "bf16"],
                      mere=_mere({"f32": 0.0, "bf16": 0.002}), rows=rows, probe=dict.fromkeys(PROBE_KEYS), bound=0.1,
                      timed=False, aggregate=None)
  text = path.read_text()
  assert "time not recorded" in text and "overhead not measured" in text
  assert "| s | f32 | 0.0000 | 0.0000 | 0.0000 | - |" in text
  assert "| s | bf16 | 0.0020 | 0.0020 | 0.0020 | 1.00 |" in text
  probe = dict(zip(PROBE_KEYS, (10, 3, 1, 0.5, 0.01)))
  text = write_report(tmp_path / "r2.md", run="r", sites=[("s", 8, 4)], candidates=["bf16"],
                      mere=_mere({"bf16": 0.002}), rows=rows, probe=probe, bound=0.1, timed=False,
                      aggregate=None).read_text()
  assert "every 10 steps, 3 updates, 0.50 s timed over 1 updates, overhead 1.00% of training step time." in text


def test_report_says_which_real_operands_it_scored(tmp_path):
  """The real-operands column once scored one zero-padded eval batch (samples 1, interval [0, inf])
  without a word; the report now names its samples and rows, and why they are fewer than asked."""
  rows = [{"site": "s", "gemm": g, "candidate": "xla_bf16", "speedup": "not timed", "reason": "r"} for g in GEMMS]
  common = dict(run="r", sites=[("s", 8, 4)], candidates=["bf16"], mere=_mere({"bf16": 0.002}), rows=rows,
                probe=dict.fromkeys(PROBE_KEYS), bound=0.1, timed=False, aggregate=None)
  note = "the eval split has 200 real rows, fewer than --samples 3 x --rows 256: ..."
  text = write_report(tmp_path / "r.md", **common,
                      real_operands={"samples": 2, "rows": 100, "eval_rows": 200, "note": note}).read_text()
  assert "Real operands: 2 samples of 100 eval rows each, padding rows left out. Note: " + note in text
  text = write_report(tmp_path / "r2.md", **common,
                      real_operands={"samples": 3, "rows": 256, "eval_rows": 768, "note": ""}).read_text()
  assert "Real operands: 3 samples of 256 eval rows each, padding rows left out.\n" in text


def test_heatmaps_of_every_setting_share_one_colour_scale_without_zeros(tmp_path):
  """The learned and the real heatmap are read side by side: one colour scale over every setting (each
  had its own), and the f32 reference's MERE of 0 is not pinned to 1e-6 (which squeezed the rest)."""
  mere = _mere({"f32": 0.0, "bf16": 0.002, "fp8": 0.05})
  mere["s"]["real"]["fp8"] = {g: {"mean": 0.2} for g in GEMMS}
  assert colour_range(mere, ["s"], ["f32", "bf16", "fp8"]) == pytest.approx((-2.69897, -0.69897), abs=1e-5)
  for setting in ("learned", "real"):
    assert plot_mere_heatmap(mere, ["s"], ["f32", "bf16", "fp8"], tmp_path / f"{setting}.png", setting).stat().st_size
