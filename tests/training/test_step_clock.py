"""StepClock: training throughput over the timed segments of a run."""

import time

from jaxrec.training.loop import StepClock


def test_a_boundary_at_the_first_step_measures_nothing():
  """The process's first step (its compile) is not timed: a log there has no rate (None), not 0 examples/s;
  the time at a boundary (between lap and resume) is left out."""
  clock = StepClock()
  clock.stepped(None)
  clock.lap()
  assert clock.steps == 0 and clock.rate(128) is None
  clock.resume()
  for _ in range(3):
    time.sleep(0.01)
    clock.stepped(None)
  clock.lap()
  time.sleep(0.5)  # an eval at the boundary
  clock.resume()
  time.sleep(0.01)
  clock.stepped(None)
  clock.lap()
  assert clock.steps == 4 and 0.04 <= clock.seconds < 0.5
  assert clock.rate(128) == 128 * 4 / clock.seconds
