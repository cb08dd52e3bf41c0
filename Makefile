# Set-up, main job and tests, each installing what it needs first (idempotent: stamps
# in .venv record what is done and are redone when their inputs change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's extension builder guesses CUDA_HOME from nvcc's path (/usr/local) and then
# fails to link -lcudart; the toolkit lives in /usr/local/cuda.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: install demo test bench gpu-check clean

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

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks.bench_bn_act --out benchmarks/results/bn_act.json
	$(PY) -m benchmarks.bench_train_step --out benchmarks/results/train_step.json

gpu-check: install
	$(PY) -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json

clean:
	rm -rf build *.egg-info engine/_C*.so $(VENV)
