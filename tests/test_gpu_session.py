"""bench/gpu_session.sh, the prepared GPU script: parses, rejects unknown parts, and time-boxes."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_session.sh"


def _run(args, tmp_path, budget):
  env = {**os.environ, "OUT": str(tmp_path), "BUDGET_S": str(budget)}
  return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_script_parses():
  assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_parts_that_do_not_fit_the_budget_are_skipped_not_started(tmp_path):
  r = _run(["kernels", "dlrm", "precision", "serve"], tmp_path, budget=10)
  assert r.returncode == 0, r.stderr
  skipped = (tmp_path / "skipped.log").read_text()
  for part in ("kernels", "dlrm", "precision", "serve"):
    assert f"skip {part}" in skipped
    assert (tmp_path / f"{part}.log").exists()
  assert "done in" in r.stdout


def test_unknown_part_is_refused(tmp_path):
  r = _run(["kernel"], tmp_path, budget=10)
  assert r.returncode == 2 and "unknown part kernel" in r.stderr
