"""Shared fixtures: where the real datasets are (tests that need them carry `@pytest.mark.realdata`)."""

import faulthandler
import os
import sys

# 8 host devices, so the data-parallel / sharded-embedding tests can build meshes of 1 and 8
# devices in one process. Must be set before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache per test session, shared by the xdist workers and the
# subprocesses tests start (they inherit the environment): many files compile the same tiny models'
# steps, and a cold cache already takes about a fifth off those files' time. Created empty each
# session (hermetic: no run depends on an earlier one's compiles) and removed by the process that
# made it; a JAX_COMPILATION_CACHE_DIR of the caller's own is left as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrec-test-jax-cache-")
  os.environ["JAXREC_TEST_CACHE_OWNER"] = str(os.getpid())
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from pathlib import Path

import pytest

# Strict dtype promotion (../shared/STYLE.md 14) is not switched on for the whole suite: optax
# 0.2.8's Adam bias correction computes `float ** int32 count`, which strict promotion rejects
# inside optax itself (TypePromotionError in optax/tree_utils/_tree_math.py).

from jaxrec.data.paths import default_data_dir

# Per-test limits. pytest-timeout fails a test after `timeout` s (pyproject.toml; SLOW_TIMEOUT_S for slow
# tests); a native-code hang does not return to Python, so the watchdog below prints every thread's stack
# to the real stderr (shown by xdist too) once, a minute before that. Once: faulthandler reads the frames
# of threads that may be running, which is safe only while they wait (as hung ones do); dumping again and
# again into a running test crashed its process.
SLOW_TIMEOUT_S = 3600
STACKS_BEFORE_TIMEOUT_S = 60
_stacks_file = None  # the real stderr, taken while pytest's output capture is suspended


def pytest_configure(config):
  global _stacks_file
  _stacks_file = os.fdopen(os.dup(sys.stderr.fileno()), "w")


def pytest_unconfigure(config):
  faulthandler.cancel_dump_traceback_later()
  if _stacks_file is not None:
    _stacks_file.close()
  if os.environ.get("JAXREC_TEST_CACHE_OWNER") == str(os.getpid()):  # the session's process, not a worker
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
      item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item, settings):
  """Arms the stack dump beside pytest-timeout's own timer (None: pytest-timeout still sets that), from
  the limit it resolved (marker, --timeout, PYTEST_TIMEOUT or the ini value)."""
  faulthandler.dump_traceback_later(max(settings.timeout - STACKS_BEFORE_TIMEOUT_S, 1.0), file=_stacks_file)


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item):
  faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def data_dir() -> Path:
  """The real-data folder ($JAXREC_DATA_DIR, else <repo>/../shared/data); skips the test when absent."""
  path = default_data_dir()
  if not path.is_dir():
    pytest.skip(f"real data folder {path} absent")
  return path


@pytest.fixture(autouse=True)
def no_workdir_lock_left_held():
  """Fails a test that leaves a workdir lock held (`jaxrec.training.loop.lock_workdir`), after releasing
  it: entrypoints release theirs however they end, and a leaked one is an open file that would refuse
  a later run into that folder from this process."""
  yield
  loop = sys.modules.get("jaxrec.training.loop")  # not imported: nothing can be held
  held = sorted(str(p) for p in loop._LOCKS) if loop is not None else []
  for path in held:
    loop.unlock_workdir(Path(path))
  assert not held, f"workdir locks left held: {held}"
