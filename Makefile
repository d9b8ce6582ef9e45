# jaxrec: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# pytest-xdist processes (each test file runs whole in one, so module fixtures are built once);
# 2 = the CI machine's cores. TEST_JOBS=0 runs everything in this process.
TEST_JOBS ?= 2

GPU_WHEELS := grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 fastapi==0.163.2 uvicorn==0.54.0 \
  starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 typing-inspection==0.4.5 annotated-types==0.8.0 \
  httptools==0.7.1 opentelemetry-api==1.45.3
SHARED_BENCH ?= ../shared/bench

.PHONY: help setup test test-all demo bench-dlrm gpu-prep clean

help:
	@echo "make setup      create $(VENV) with Python 3.12+ and install jaxrec with pinned dependencies"
	@echo "make test       setup, then run the CPU test suite (what CI runs)"
	@echo "make test-all   setup, then also run the slow quality tests (real data, NE targets)"
	@echo "make demo       setup, then train the DCNv2 ranker on the synthetic ads world into $(DEMO_DIR)"
	@echo "make bench-dlrm DLRMv2-like training throughput benchmark (meant for a GPU machine)"
	@echo "make gpu-prep   fetch the wheels and anchor scripts bench/gpu_session.sh needs on the GPU machine into .gpu/"
	@echo "make clean      remove $(VENV), caches and runs/"

# Find a Python >= 3.12: PATH first, then pyenv (3.12.x preferred, the version CI and the GPU
# machines run). Prints the interpreter it chose, or fails with a clear message.
$(VENV)/bin/python:
	@set -e; PYBIN=""; \
	for c in python3.12 python3.13 python3.14 python3; do \
	  p=$$(command -v $$c 2>/dev/null) || continue; \
	  if $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then PYBIN=$$p; break; fi; \
	done; \
	if [ -z "$$PYBIN" ] && command -v pyenv >/dev/null 2>&1; then \
	  for v in $$(ls "$$(pyenv root)/versions" 2>/dev/null | grep '^3\.12' | sort -rV) \
	           $$(ls "$$(pyenv root)/versions" 2>/dev/null | grep -v '^3\.12' | sort -rV); do \
	    p="$$(pyenv root)/versions/$$v/bin/python3"; \
	    if [ -x "$$p" ] && $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then PYBIN=$$p; break; fi; \
	  done; \
	fi; \
	if [ -z "$$PYBIN" ]; then \
	  echo "error: jaxrec needs Python 3.12 or newer, and none was found on PATH (python3.12, python3.13, python3.14, python3) or under pyenv." >&2; \
	  echo "       Install Python 3.12 (e.g. 'pyenv install 3.12' or your OS package) and run make again." >&2; \
	  exit 1; \
	fi; \
	echo "using $$PYBIN ($$($$PYBIN --version))"; \
	$$PYBIN -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml
	@echo "installing the pinned dependencies ($$(date -u +%T) UTC)"
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	@# pytest exits 5 when it collects nothing: treat that as a failure, never a pass.
	@# The 15 slowest tests are listed at the end: where CI time goes, without a rerun.
	@echo "pytest starts ($$(date -u +%T) UTC)"
	@set +e; $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slow and not gpu" --durations=15 $(PYTEST_ARGS); \
	rc=$$?; echo "pytest ended ($$(date -u +%T) UTC)"; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: $(STAMP)
	@set +e; $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not gpu" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m train.ranker --workdir $(DEMO_DIR) --fresh

bench-dlrm: $(STAMP)
	$(PY) -m train.bench_dlrm

# What the lent GPU machine lacks (its image has no grain, FastAPI or uvicorn, and ../shared does
# not travel): wheels for CPython 3.12 x86-64 and the anchor scripts, into .gpu/ (git-ignored;
# name it in the device tool's carry). Then: bash bench/gpu_session.sh [kernels dlrm precision serve]
gpu-prep: $(STAMP)
	@mkdir -p .gpu/whl .gpu/bench
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux1_x86_64 --platform any -d .gpu/whl $(GPU_WHEELS)
	@if [ -d $(SHARED_BENCH) ]; then cp $(SHARED_BENCH)/*.py .gpu/bench/; else \
	  echo "warning: no $(SHARED_BENCH): the anchors will be skipped on the GPU" >&2; fi
	@du -sh .gpu

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs build *.egg-info
