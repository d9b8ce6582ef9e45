"""jaxrec.plotting: a PNG from a metrics JSONL file, clear errors on bad files."""

from __future__ import annotations

import json
import math

import pytest

from jaxrec.plotting import plot_training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _is_png(path) -> bool:
  return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_draws_every_panel(tmp_path):
  rows = []
  for step in range(0, 300, 10):
    rows.append({"step": step, "train/loss": 0.5 + math.exp(-step / 100), "examples_per_sec": 1e5 + step})
    if step % 100 == 0:
      rows.append({"step": step, "eval/click/ne": 0.9, "eval/click/oracle_ne": 0.8, "eval/click/auc": 0.7,
                   "eval/conversion/ne": float("nan"), "eval/conversion/auc": 0.6})
  out = plot_training_curves(_write(tmp_path / "metrics.jsonl", rows), tmp_path / "plots" / "curves.png",
                             title="test run")
  assert out == tmp_path / "plots" / "curves.png" and _is_png(out)


def test_one_panel_and_blank_lines(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "eval/click/auc": 0.5}\n\n{"step": 2, "eval/click/auc": 0.6, "note": "x"}\n')
  assert _is_png(plot_training_curves(path, tmp_path / "out.png"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no log lines to plot"),
        ("\n  \n", "no log lines to plot"),
        ('{"train/loss": 0.5}\n', r':1: every line needs a numeric "step", got None'),
        ('{"step": 1, "train/loss": 0.5}\n{"step": "2"}\n', r':2: every line needs a numeric "step"'),
        ('{"step": 1}\nnot json\n', ":2: not valid JSON"),
        ("[1, 2]\n", ":1: expected a JSON object, got list"),
        ('{"step": 1, "eval/loss": 0.3}\n', "nothing to plot"),
    ],
)
def test_bad_files_raise_value_error(tmp_path, text, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    plot_training_curves(path, tmp_path / "out.png")
  assert not (tmp_path / "out.png").exists()
