"""jaxrec.progress: the mode follows enabled / TTY / $CI, and every mode counts."""

from __future__ import annotations

import doctest
import io

import pytest

from jaxrec import progress as progress_module
from jaxrec.progress import progress


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


@pytest.fixture(autouse=True)
def _no_ci(monkeypatch):
  monkeypatch.delenv("CI", raising=False)


def test_disabled_prints_nothing_but_counts():
  out = _Terminal()
  with progress(10, "train", enabled=False, file=out) as bar:
    for _ in range(10):
      bar.update(1, loss=0.5)
  assert bar.mode == "off" and bar.n == 10 and out.getvalue() == ""


def test_log_file_gets_a_line_per_quarter():
  out = io.StringIO()  # not a terminal
  with progress(1000, "train", file=out) as bar:
    for i in range(1000):
      bar.update(1, loss=1 / (i + 1), lr="cosine")
  lines = out.getvalue().splitlines()
  assert bar.mode == "lines" and len(lines) == 4
  assert [line.split()[1] for line in lines] == ["25%", "50%", "75%", "100%"]
  assert lines[-1].startswith("train: 100% 1000/1000 [") and lines[-1].endswith("loss=0.001, lr=cosine]")
  assert "\r" not in out.getvalue()


def test_ci_quiets_even_a_terminal_and_close_reports_a_short_run(monkeypatch):
  monkeypatch.setenv("CI", "true")
  out = _Terminal()
  with pytest.raises(RuntimeError):
    with progress(100, "eval", file=out) as bar:
      bar.update(30)  # passes 25%: one line
      bar.update(5)
      raise RuntimeError("stop")
  lines = out.getvalue().splitlines()
  assert bar.mode == "lines" and len(lines) == 2  # 25%, then the final count at close
  assert " 30/100 " in lines[0] and " 35/100 " in lines[1]
  bar.close()  # a second close prints nothing more
  assert len(out.getvalue().splitlines()) == 2


def test_unknown_total_prints_once_at_close():
  out = io.StringIO()
  with progress(0, "stream", file=out) as bar:
    bar.update(7)
  assert out.getvalue().startswith("stream: 7 [") and len(out.getvalue().splitlines()) == 1


def test_terminal_gets_a_tqdm_bar():
  out = _Terminal()
  with progress(5, "train", file=out) as bar:
    for _ in range(5):
      bar.update(1, loss=0.25)
  assert bar.mode == "bar" and bar.n == 5
  assert "\r" in out.getvalue() and "5/5" in out.getvalue() and "loss=0.25" in out.getvalue()


def test_docstring_examples():
  assert doctest.testmod(progress_module).failed == 0
