"""The suite's hang guard (tests/conftest.py, pyproject.toml): a test that hangs fails with its threads'
stacks instead of stalling CI; a native wait that the timeout's signal cannot end still gets them printed."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HANGS = '''
import os
import time

import pytest


@pytest.mark.timeout(2)
def test_python_hang():
  time.sleep(60)


@pytest.mark.timeout(2)
def test_native_wait():
  os.system("sleep 4")  # system() waits on in C, retrying when the timeout's SIGALRM interrupts it


def test_quick():
  pass
'''


def test_hanging_tests_fail_with_stacks(tmp_path):
  (tmp_path / "test_hangs.py").write_text(textwrap.dedent(HANGS))
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                        "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  text = out.stdout + out.stderr
  assert out.returncode == 1, text
  assert "2 failed, 1 passed" in text, text
  assert out.stdout.count("E     Failed: Timeout (>2.0s) from pytest-timeout.") == 2, text  # the two tracebacks
  assert "test_hangs.py::test_python_hang" in out.stdout and "test_hangs.py::test_native_wait" in out.stdout, text
  # faulthandler's dump (the guard for native hangs) reaches the real stderr while the test still runs
  assert "Timeout (0:00:01)!" in out.stderr and 'in test_native_wait' in out.stderr, out.stderr
