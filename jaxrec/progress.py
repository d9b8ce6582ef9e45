"""A progress bar that behaves in terminals, log files and CI.

`progress(total, desc)` picks one of three modes when it is created:

    bar    a tqdm bar, redrawn in place: `enabled` and the stream is a terminal and $CI is unset
    lines  a plain log line at 25%, 50%, 75% and 100% (and one at close() if it stopped short),
           so a log file or CI job gets at most five lines: `enabled` but not a terminal, or $CI set
    off    nothing is printed: enabled=False (e.g. every process but the first)

In every mode `update` counts and `n` reads the count, so callers never branch on the mode.

>>> import io
>>> with progress(4, "eval", file=io.StringIO()) as bar:
...   for _ in range(4):
...     bar.update(1, loss=0.25)
>>> bar.n
4
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_COUNT_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"  # total unknown (<= 0)
_MARKS = 4  # lines mode prints at every quarter


class Progress:
  """Counts steps towards `total` and shows them in the mode `progress()` chose (`.mode`)."""

  def __init__(self, total: int, desc: str, *, mode: str, file: TextIO):
    if mode not in ("bar", "lines", "off"):
      raise ValueError(f"Progress: mode must be bar, lines or off, got {mode!r}")
    self.total, self.desc, self.mode, self.n = int(total), desc, mode, 0
    self._file = file
    self._start = time.monotonic()
    self._postfix: dict[str, object] = {}
    self._marks_done = 0
    self._printed_at = -1
    self._closed = False
    self._bar = tqdm(total=self.total, desc=desc, file=file, dynamic_ncols=True) if mode == "bar" else None

  def update(self, n: int = 1, **postfix: float | int | str) -> None:
    """Advances by `n`; keyword arguments replace the shown values (`loss=0.31`)."""
    self.n += n
    if postfix:
      self._postfix = postfix
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(n)
    elif self.mode == "lines" and self.total > 0:
      marks = min(_MARKS, self.n * _MARKS // self.total)
      if marks > self._marks_done:
        self._marks_done = marks
        self._print_line()

  def _print_line(self) -> None:
    postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self._postfix.items())
    line = tqdm.format_meter(self.n, self.total if self.total > 0 else None, time.monotonic() - self._start,
                             prefix=self.desc, postfix=postfix,
                             bar_format=_LINE_FORMAT if self.total > 0 else _COUNT_FORMAT)
    print(line, file=self._file, flush=True)
    self._printed_at = self.n

  def close(self) -> None:
    """Ends the bar (lines mode: prints the final count if no line showed it). Safe to call twice."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.mode == "lines" and self._printed_at != self.n:
      self._print_line()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(total: int, desc: str, *, enabled: bool = True, file: TextIO | None = None) -> Progress:
  """A `Progress` over `total` steps written to `file` (default: sys.stderr); see the module doc for modes."""
  file = sys.stderr if file is None else file
  if not enabled:
    mode = "off"
  elif file.isatty() and not os.environ.get("CI"):
    mode = "bar"
  else:
    mode = "lines"
  return Progress(total, desc, mode=mode, file=file)
