# Everything a user or CI needs, from a machine with only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The default installs quickly here; override e.g. make TORCH_SPEC='torch==2.6.0' install
TORCH_SPEC ?= torch==2.13.0
NPROC ?=
ARGS ?=
PEERS_ARGS ?=
PYTEST_ARGS ?=
# Test files run in parallel, each whole in one worker (its shared runs stay shared), the longest first
# (tests/conftest.py). One worker more than cores: a quarter of the tests' time is spent waiting (on rendezvous,
# heartbeats, fsync and signals), which a third worker fills on 2 cores (the suite in 346 s instead of 403 here).
TEST_WORKERS ?= $(shell echo $$(( $$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2) + 1 )))
# Bytecode is made at install for what the tests' processes import (torch in every one of them), not for packages
# one process or two imports, which compile on first use: scipy and scikit-learn (the digits task), matplotlib
# (ddp plot), wandb and tensorboard (one tracker test each), datasets and the pandas and pyarrow it imports (the
# stream tests'), networkx (torch.compile's), pip and setuptools (the install's), and transformers' 400 other
# architectures (GPT-2 is the tests'). 18 s of the 27 s of compiling everything here, before datasets.
NOT_COMPILED := '/site-packages/(scipy|sklearn|matplotlib|wandb|tensorboard|datasets|pandas|pyarrow|networkx|pip|setuptools)/|/transformers/models/(?!gpt2/|auto/|__init__)'

.PHONY: install train-ddp test test-gpu gpu-check lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)' --no-compile
	$(PY) -m pip install --quiet -e '.[dev,plot,digits,tensorboard,wandb,hf]' --no-compile
	@# Bytecode for what was installed, on every core at once (pip compiles file by file: 14 s of torch's 22 s
	@# install here). A few files of some packages' test data are not Python 3 and do not compile: no error.
	$(PY) -m compileall -q -j 0 -x $(NOT_COMPILED) "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	touch $@

install: $(VENV)/.installed  ## create .venv and install torch, the package and dev tools

train-ddp: install  ## train with torchrun on every GPU, or on NPROC (default 2) CPU processes
	NPROC=$(NPROC) PYTHON=$(PY) bash launch/train_ddp.sh $(ARGS)

test: install  ## the test suite (CPU, gloo, real torchrun processes)
	@# Bytecode first: the suite starts ~500 processes, and where PYTHONDONTWRITEBYTECODE is set each
	@# would compile the package's sources again (0.24 s of CPU apiece here)
	$(PY) -m compileall -q ddp tests examples bench
	$(PY) -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-gpu: install  ## the GPU tests (NCCL); needs CUDA
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

gpu-check: install  ## on a CUDA host: GPU tests, train-ddp on NCCL, bench --quick; one report (< 8 min)
	$(PY) bench/gpu_check.py $(ARGS)

lint: install  ## ruff check + ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]' --no-compile
	touch $@

bench: $(VENV)/.bench-installed  ## benchmarks, the peers table (accelerate, Lightning), snapshots as users run them
	$(PY) bench/bench.py $(ARGS)
	$(PY) bench/peers.py $(PEERS_ARGS)
	$(PY) bench/peers.py --snapshots --repeats 5

clean:
	rm -rf runs .pytest_cache .ruff_cache bench/results.json bench/peers.json bench/snapshots.json *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
