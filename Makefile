# Set-up, main job and tests, each installing what it needs first (idempotent: stamps
# in .venv record what is done and are redone when their inputs change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's extension builder guesses CUDA_HOME from nvcc's path (/usr/local) and then
# fails to link -lcudart; the toolkit lives in /usr/local/cuda.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2
# Parallel test workers: one per CPU core (pytest-xdist's auto).
TEST_WORKERS ?= auto

.PHONY: install demo test bench gpu-check gpu-ext compile-gate triton36-venv clean

# Targets that pip-install refuse without the network (the GPU machine has none) instead of
# hanging on retries: one TCP connect to the package index (3 s cap; a proxy's host when
# HTTPS_PROXY is set), cheaper than any pip call and independent of pip's own config.
# ENGINE_OFFLINE=1 refuses without trying.
define NEEDS_NETWORK
@if [ "$(ENGINE_OFFLINE)" = 1 ] || ! $(PYTHON) -c 'import os, socket, urllib.parse as u; \
  url = u.urlparse(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or "https://pypi.org"); \
  socket.create_connection((url.hostname, url.port or 443), timeout=3)' 2>/dev/null; then \
  echo "make $@: this step pip-installs and there is no network (or ENGINE_OFFLINE=1)." >&2; \
  echo "  Offline, from the checkout: CUDA_HOME=/usr/local/cuda python3 setup.py build_ext --inplace" >&2; \
  echo "  (or carry .gpu-ext/ from 'make gpu-ext'), then python3 -m benchmarks.gpu_check --quick" >&2; \
  echo "  --deadline-s 500 --out \$$OUT/gpu_check.json (see README, On a GPU machine)." >&2; \
  exit 2; fi
endef

install: $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: setup.py requirements.txt
	$(NEEDS_NETWORK)
	@echo "== installing the dependencies into $(VENV) (requirements.txt; a few minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The compiled extension (engine._C): about 4 minutes on 2 cores; ENGINE_SKIP_EXT=1 skips it.
$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(wildcard csrc/*) setup.py
	$(NEEDS_NETWORK)
	@echo "== building engine._C from csrc/ (C++ and, with a CUDA toolkit, CUDA for sm_90): several quiet minutes on 2 cores"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/engine demo

# Triton 3.6 (what torch 2.11 ships, and the GPU machines run) for the compile gate, which
# compiles the kernels under it too: triton and numpy only, no torch (about 1 minute, 700 MB).
TRITON36 := .venv-triton36
$(TRITON36)/.stamp:
	$(NEEDS_NETWORK)
	@echo "== Triton 3.6 venv for the compile gate ($(TRITON36): triton and numpy, about a minute)"
	test -x $(TRITON36)/bin/python || $(PYTHON) -m venv $(TRITON36)
	$(TRITON36)/bin/pip install -q "triton==3.6.*" numpy
	touch $@

triton36-venv: $(TRITON36)/.stamp

# The suite, then the mutation check: each named break of the code must fail the tests
# that claim to catch it (tools/mutation_check.py, a few minutes).
test: install triton36-venv
	@echo "== the test suite, one pytest-xdist worker per core (TEST_WORKERS=$(TEST_WORKERS))"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
	@echo "== the mutation check: each named break of the code must fail the tests meant to catch it"
	$(PY) tools/mutation_check.py

# Every Triton and CUDA kernel compiled for sm_90 (and sm_100) without a GPU; see benchmarks/compile_gate.py.
compile-gate: install triton36-venv
	$(PY) -m benchmarks.compile_gate --out benchmarks/results/compile_sm90.json

bench: install
	$(PY) -m benchmarks.bench_bn_act --out benchmarks/results/bn_act.json
	$(PY) -m benchmarks.bench_train_step --out benchmarks/results/train_step.json

# No install step: it must run on the GPU machine, which has no network. The quick check
# uses the prebuilt extension (.gpu-ext/) when it matches, else builds it in place.
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PY) -m benchmarks.gpu_check --quick --deadline-s 540 --out benchmarks/results/gpu_check.json

# engine._C for the GPU machine, built here: torch 2.11.0+cu130 under Python 3.12 (what the
# machine runs), sm_90, stripped, into .gpu-ext/ with the hash of csrc/ and setup.py it was
# built from; gpu_check uses it only when that hash matches and it imports. The venv
# (.venv-gpu-ext, ~5 GB with CUDA's wheels) is kept for rebuilds.
PY312 ?= python3.12
GPU_EXT_VENV := .venv-gpu-ext
# PyPI's torch 2.11.0 for Linux x86-64 is the +cu130 build (checked below).
TORCH_GPU := torch==2.11.0
gpu-ext: $(GPU_EXT_VENV)/.stamp
	rm -rf .gpu-ext build/gpu-ext
	mkdir -p build
	$(PYTHON) -m benchmarks.gpu_check --ext-hash > build/gpu-ext.hash
	env TORCH_CUDA_ARCH_LIST=9.0 $(GPU_EXT_VENV)/bin/python setup.py build_ext \
	  --build-lib .gpu-ext --build-temp build/gpu-ext
	strip --strip-debug .gpu-ext/engine/_C.*.so
	$(GPU_EXT_VENV)/bin/python -c 'import glob, importlib.util as u, torch; \
	  s = u.spec_from_file_location("engine._C", glob.glob(".gpu-ext/engine/_C.*.so")[0]); \
	  m = u.module_from_spec(s); s.loader.exec_module(m); \
	  assert m.built_with_cuda(), "built without CUDA: no nvcc found (set CUDA_HOME)"'
	mv build/gpu-ext.hash .gpu-ext/hash
	@ls -l .gpu-ext/engine/_C.*.so; echo "hash $$(cat .gpu-ext/hash): carry .gpu-ext to the GPU machine"

$(GPU_EXT_VENV)/.stamp:
	@$(PY312) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { \
	  echo "make gpu-ext: needs a python3.12 that runs (the GPU machine's Python):" \
	  "PY312=/path/to/python3.12 (under pyenv: PY312=\$$(pyenv root)/versions/3.12.X/bin/python3.12)" >&2; exit 2; }
	$(NEEDS_NETWORK)
	test -x $(GPU_EXT_VENV)/bin/python || $(PY312) -m venv $(GPU_EXT_VENV)
	$(GPU_EXT_VENV)/bin/pip install -q "$(TORCH_GPU)" "setuptools>=64" wheel ninja pybind11 "numpy<2.4"
	$(GPU_EXT_VENV)/bin/python -c 'import torch; assert torch.version.cuda == "13.0", torch.__version__'
	touch $@

clean:
	rm -rf build *.egg-info engine/_C*.so $(VENV) $(TRITON36) .gate-cache .gpu-ext
