# Set-up, main job and tests, each installing what it needs first (idempotent: stamps
# in .venv record what is done and are redone when their inputs change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's extension builder guesses CUDA_HOME from nvcc's path (/usr/local) and then
# fails to link -lcudart; the toolkit lives in /usr/local/cuda.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: install demo test bench gpu-check compile-gate triton36-venv clean

install: $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The compiled extension (engine._C): about 4 minutes on 2 cores; ENGINE_SKIP_EXT=1 skips it.
$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(wildcard csrc/*) setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/engine demo

# Triton 3.6 (what torch 2.11 ships, and the GPU machines run) for the compile gate, which
# compiles the kernels under it too: triton and numpy only, no torch (about 1 minute, 700 MB).
TRITON36 := .venv-triton36
$(TRITON36)/.stamp:
	test -x $(TRITON36)/bin/python || $(PYTHON) -m venv $(TRITON36)
	$(TRITON36)/bin/pip install -q "triton==3.6.*" numpy
	touch $@

triton36-venv: $(TRITON36)/.stamp

# The suite, then the mutation check: each named break of the code must fail the tests
# that claim to catch it (tools/mutation_check.py, a few minutes).
test: install triton36-venv
	$(PY) -m pytest -q
	$(PY) tools/mutation_check.py

# Every Triton and CUDA kernel compiled for sm_90 (and sm_100) without a GPU; see benchmarks/compile_gate.py.
compile-gate: install triton36-venv
	$(PY) -m benchmarks.compile_gate --out benchmarks/results/compile_sm90.json

bench: install
	$(PY) -m benchmarks.bench_bn_act --out benchmarks/results/bn_act.json
	$(PY) -m benchmarks.bench_train_step --out benchmarks/results/train_step.json

gpu-check: install
	$(PY) -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json

clean:
	rm -rf build *.egg-info engine/_C*.so $(VENV) $(TRITON36) .gate-cache
