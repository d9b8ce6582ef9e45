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
  for part in ("kernels", "dlrm", "precision", "serve"):
    assert f"skip {part}" in (tmp_path / f"{part}.log").read_text()
  assert "done in" in r.stdout and "skipped: kernels dlrm precision serve" in r.stdout


# stands in for python: writes the result files each command of the script would write, instantly
# (train.probe takes 2 s, so that the part after it no longer fits its box)
FAKE_PY = """#!/usr/bin/env bash
case "$*" in
  *kernels_pallas.bench_quantize*) mkdir -p runs/bench; echo x > runs/bench/quantize.csv ;;
  *kernels_pallas.bench*) mkdir -p runs/bench; echo x > runs/bench/bench.csv ;;
  *train.probe*) mkdir -p runs/probe; echo x > runs/probe/report.md; sleep 2 ;;
  *train.bench_precision*) mkdir -p runs/bench_precision; echo x > runs/bench_precision/bench_precision.md ;;
esac
"""


def test_at_most_eight_files_land_in_out(tmp_path):
  """The device tool returns at most 8 files from $OUT. Three parts that write all four result
  files and a fourth skipped part used to leave 9 (4 logs, 4 results and skipped.log): one lost."""
  repo = tmp_path / "repo"
  (repo / "bench").mkdir(parents=True)
  (repo / "bench" / "gpu_session.sh").write_text(SCRIPT.read_text())  # runs in repo/, not in ours
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_PY)
  fake.chmod(0o755)
  out = tmp_path / "out"
  env = {**os.environ, "OUT": str(out), "BUDGET_S": "301", "PY": str(fake)}
  r = subprocess.run(["bash", str(repo / "bench" / "gpu_session.sh")], cwd=repo, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  files = sorted(f.name for f in out.iterdir())
  assert {"bench.csv", "quantize.csv", "probe_report.md", "bench_precision.md"} <= set(files)
  assert len(files) <= 8, files
  assert "skip serve" in (out / "serve.log").read_text() and "skipped: serve" in r.stdout


def test_unknown_part_is_refused(tmp_path):
  r = _run(["kernel"], tmp_path, budget=10)
  assert r.returncode == 2 and "unknown part kernel" in r.stderr


def script_between(start: str, end: str) -> str:
  """The script's text from `start` up to `end` (e.g. its helper functions, to run them alone)."""
  text = SCRIPT.read_text()
  return text[text.index(start):text.index(end)]


def test_a_step_that_no_longer_fits_is_skipped():
  """Inside the serve part, whose steps' timeouts add up to more than its box, each step after the
  first server runs only while it still fits (bash's SECONDS set by hand stands for time spent)."""
  text = SCRIPT.read_text()
  defs = script_between("left() {", "part_kernels() {")
  body = text[text.index("part_serve() {"):]
  assert "fits serve_anchor 100 &&" in body and "fits bench_engine 40 &&" in body
  script = ("setup_env() { :; }\n" + defs + '\nBUDGET_S=300; SKIPPED=; SECONDS=250\n'
            'fits a 40 && echo ran-a\nfits b 100 && echo ran-b\necho "skipped:$SKIPPED"\n')
  r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  assert "ran-a" in r.stdout and "ran-b" not in r.stdout
  assert "== skip b: 50 s left, needs 100" in r.stdout and "skipped: b" in r.stdout


def test_a_load_run_that_no_longer_fits_ends_the_concurrency_sweep(tmp_path):
  """serve_and_load runs one loadgen per concurrency while one (45 s with the server's stop) still
  fits; the fake python's server says "serving" at once and each load run takes 2 s."""
  defs = script_between("left() {", "part_kernels() {")
  func = script_between("serve_and_load() {", "part_serve() {")
  fake = tmp_path / "fake_python"
  fake.write_text('#!/usr/bin/env bash\ncase "$*" in\n  *serve.loadgen*) echo "load $*"; sleep 2 ;;\n'
                  '  *) echo serving; exec sleep 30 ;;\nesac\n')
  fake.chmod(0o755)
  script = (f"setup_env() {{ :; }}\nPY={fake}\n" + defs + func
            + '\nBUDGET_S=1000; SKIPPED=; SECONDS=954\nserve_and_load 8099 8 32 64 128\necho "skipped:$SKIPPED"\n')
  r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert "--concurrency 32" in r.stdout and "--concurrency 64" not in r.stdout
  assert "skipped: 8-worker(s) c=64" in r.stdout
