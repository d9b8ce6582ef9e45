"""Ctrl-C and SIGTERM in the command-line entrypoints (train.*, serve.replay, serve.loadgen,
serve.bench_engine): one line and exit status 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM), never a traceback. `python -m serve` takes either signal as "stop": it drains the requests in
flight and exits 0. The kernel benchmarks (kernels_pallas, which does not import jaxrec) print one line
and exit 130 on Ctrl-C.

SIGTERM is what `kill`, `timeout`, Slurm and Kubernetes send. Python's default ends the process on the
spot, so a training run lost the checkpoint it was writing; within `sigterm_interrupts()` it raises
`Terminated`, a KeyboardInterrupt, and takes the path Ctrl-C takes (a run finishes the checkpoint being
written, then says how to resume).

>>> @entrypoint
... def main(argv=None) -> int:
...   raise KeyboardInterrupt   # Ctrl-C while it works: "interrupted" on stderr
>>> main()
130
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised in the main thread: every `except KeyboardInterrupt` handles it as it handles Ctrl-C."""


def exit_status(e: KeyboardInterrupt) -> int:
  """128 + the signal that interrupted: 143 for SIGTERM (`Terminated`), else 130 (SIGINT, Ctrl-C)."""
  return 128 + int(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
  """Within: SIGTERM raises `Terminated` in the main thread (elsewhere, where Python cannot take
  signals, this does nothing). The handler before is restored on the way out."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def terminate(signum, frame):
    raise Terminated()

  before = signal.signal(signal.SIGTERM, terminate)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
  """Within: a Ctrl-C or SIGTERM waits until the block is done, then raises (KeyboardInterrupt or
  `Terminated`) as it would have. For short steps that must not stop half-way, such as starting a
  checkpoint's write. Main thread only (elsewhere, where Python cannot take signals, this does nothing)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received: list[int] = []
  before = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for sig, handler in before.items():
      signal.signal(sig, handler)
  if received:
    raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()


def entrypoint(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
  """Wraps an entrypoint's `main(argv) -> exit status`: runs it under `sigterm_interrupts`, and a Ctrl-C
  or SIGTERM that `main` does not handle itself prints "interrupted" and returns `exit_status`."""
  @functools.wraps(main)
  def run(argv: list[str] | None = None) -> int:
    try:
      with sigterm_interrupts():
        return main(argv)
    except KeyboardInterrupt as e:
      print("\ninterrupted", file=sys.stderr, flush=True)
      return exit_status(e)
  return run
