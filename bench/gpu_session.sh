#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, as one time-boxed script for the lent device.
#
# Here (CPU machine with PyPI access), once:   make gpu-prep
#   -> .gpu/whl/ (wheels the GPU image lacks: grain, fastapi, uvicorn and their needs) and
#      .gpu/bench/ (copies of ../shared/bench's anchors, which do not travel with the repo)
# There (device tool): run command "bash bench/gpu_session.sh PART...", carry [".gpu"], timeout_s 600.
# The boxes below add up to 1020 s, more than one 600 s command: first call "BUDGET_S=590 bash
# bench/gpu_session.sh precision serve", then "bash bench/gpu_session.sh kernels dlrm" (BUILD.md).
#
# PARTs, in the order given, each time-boxed; a part is skipped when less than its box is left of
# BUDGET_S (default 540 s, inside one 600 s device command):
#   kernels    pytest -m gpu; kernels_pallas.bench (GEMMs, fused layer); bench_quantize      (~4 min box)
#   dlrm       train.bench_dlrm beside dlrm_anchor.py all (DLRMv2-like training throughput) (~3 min box)
#   precision  train.probe (Dispatch timed on the GPU) then train.bench_precision           (~5 min box)
#   serve      a short ranker run, python -m serve (--workers 1, then 8) + serve.loadgen,
#              serve_anchor.py all, serve.bench_engine, then 12 workers if time is left      (~5 min box)
# Logs and result files land in $OUT: one log per part (a skipped part's log says so) plus bench.csv,
# quantize.csv, probe_report.md and bench_precision.md, 8 files at most, the most the device tool
# returns (a ninth, whichever, would not come back); the last line of output lists the skipped parts.
# Copy the numbers into docs/BENCHMARKS.md with this command and the date.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1
READY=0
SKIPPED=
setup_env() {  # once, when the first part runs: the wheels the image lacks
  [ "$READY" = 1 ] && return 0
  READY=1
  if [ -d .gpu/whl ] && ls .gpu/whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
      || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
    # every module the parts import, checked once: a missing one is named here, not mid-part
    $PY -c "import grain, fastapi, uvicorn, httptools, pydantic, aiohttp, serve.app, train.probe" \
      || echo "preflight: an import failed (above); add its wheel to GPU_WHEELS in the Makefile" >&2
  else
    export PYTHONPATH=$PWD
    echo "no .gpu/whl: run 'make gpu-prep' on the CPU machine and carry .gpu (grain, fastapi, uvicorn are missing there)" >&2
  fi
}
PY=${PY:-python3}
ANCHORS=.gpu/bench

left() { echo $((BUDGET_S - SECONDS)); }
box() {  # box PART SECONDS: true if the part fits in what is left
  if [ "$(left)" -lt "$2" ]; then echo "== skip $1: $(left) s left, needs $2"; SKIPPED="$SKIPPED $1"; return 1; fi
  echo "== $1 (box $2 s, $(left) s left) $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)"
  setup_env
}

fits() {  # fits STEP SECONDS: true if a step of a part (its timeouts' sum) still fits in what is left
  if [ "$(left)" -lt "$2" ]; then echo "== skip $1: $(left) s left, needs $2"; SKIPPED="$SKIPPED $1"; return 1; fi
}

part_kernels() {
  box kernels 240 || return 0
  # only the files that hold GPU tests: collecting every test file needs test-only packages the
  # image lacks (httpx2 for the HTTP tests) and costs a minute
  timeout 100 $PY -m pytest -m gpu -q -p no:cacheprovider $(grep -rl "mark.gpu" tests) 2>&1 | tail -20
  timeout 90 $PY -m kernels_pallas.bench --iters 20 --seconds 60 --out runs/bench 2>&1
  timeout 40 $PY -m kernels_pallas.bench_quantize --iters 20 --seconds 25 --out runs/bench 2>&1
  cp runs/bench/bench.csv runs/bench/quantize.csv "$OUT"/ 2>/dev/null
}

part_dlrm() {
  box dlrm 180 || return 0
  timeout 80 $PY -m train.bench_dlrm 2>&1
  if [ -f $ANCHORS/dlrm_anchor.py ]; then timeout 90 $PY $ANCHORS/dlrm_anchor.py all 2>&1; else echo "no $ANCHORS/dlrm_anchor.py"; fi
}

part_precision() {
  box precision 300 || return 0
  # 1000 steps: the statistics settle well before; Dispatch times every candidate GEMM on the fresh machine
  timeout 150 $PY -m train.probe --workdir runs/probe --fresh --train.steps 1000 2>&1 | tail -30
  timeout 140 $PY -m train.bench_precision --run runs/probe --batch 8192 --variants bf16,plan,fp8_row,fp8_delayed \
    --out runs/bench_precision 2>&1 | tail -20
  cp runs/probe/report.md "$OUT"/probe_report.md 2>/dev/null
  cp runs/bench_precision/bench_precision.md "$OUT"/ 2>/dev/null
}

serve_and_load() {  # serve_and_load PORT WORKERS CONCURRENCY...
  local port=$1 workers=$2; shift 2
  $PY -m serve --workdir runs/gpu_demo --port "$port" --workers "$workers" > "/tmp/serve_$port.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 90); do grep -q "serving" "/tmp/serve_$port.log" && break; sleep 1; done
  for c in "$@"; do
    fits "$workers-worker(s) c=$c" 45 || break  # a loadgen run (40 s at most) and the server's stop
    timeout 40 $PY -m serve.loadgen --url "http://127.0.0.1:$port" --model gpu_demo --concurrency "$c" \
      --candidates 200 --duration 15 2>&1
  done
  kill "$pid"; wait "$pid" 2>/dev/null
  tail -3 "/tmp/serve_$port.log"
}

part_serve() {
  box serve 300 || return 0
  timeout 90 $PY -m train.ranker --workdir runs/gpu_demo --fresh --train.steps 500 --no-train.progress 2>&1 | tail -2
  # the box holds the training run and the first server (90 + 90 + 2 x 40 s at worst); the steps after
  # it run only while they still fit, so the part never runs past BUDGET_S
  serve_and_load 8000 1 8 32
  fits serve_anchor 100 && { if [ -f $ANCHORS/serve_anchor.py ]; then timeout 100 $PY $ANCHORS/serve_anchor.py all 2>&1
                             else echo "no $ANCHORS/serve_anchor.py"; fi; }
  # 8 workers: c=32 and c=64 are where >= 4,000 req/s at p99 <= 25 ms can show (Little's law: 4,000/s x
  # 25 ms = 100 in flight at most, fewer with the tail); c=128 shows the saturated rate
  fits "serve-workers-8" 135 && serve_and_load 8001 8 32 64 128
  fits bench_engine 40 && timeout 40 $PY -m serve.bench_engine --workdir runs/gpu_demo --seconds 10 2>&1 | tail -10
  # last, only on time left over: 12 workers on the 16 cores (a worker spends ~1.3 ms of CPU per request,
  # so 8 of them run at ~65% at 4,000 req/s, unevenly: connections spread over the workers by chance)
  fits "serve-workers-12" 135 && serve_and_load 8002 12 32 64
}

[ $# -eq 0 ] && set -- kernels dlrm precision serve
for part in "$@"; do
  case $part in
    kernels|dlrm|precision|serve) ;;
    *) echo "unknown part $part (kernels, dlrm, precision, serve)" >&2; exit 2 ;;
  esac
done
for part in "$@"; do
  "part_$part" > >(tee "$OUT/$part.log") 2>&1
done
wait
echo "== done in $SECONDS s; outputs in $OUT; skipped:${SKIPPED:- none}"
