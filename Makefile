# Two commands do everything on a fresh machine: `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
# `make run` is the showcase: heterogeneous phones side-tuning MiniLM on chatterbot (MobiLLM).
# `make run EXPERIMENT=` (empty) runs conf/config.yaml's plain default (digits CNN, FedAvg).
EXPERIMENT ?= mobile_side_tuning

.PHONY: run test lint setup clean-venv flwr-run gpu-bundle

run: $(STAMP)
	$(BIN)/fedsim $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) $(ARGS)

# Two pytest-xdist workers (TEST_WORKERS=0: one process, in file order): many tests wait on a
# child process, a signal or Ray's start, so two workers on 2 cores take 0.6x the time of one.
# --durations: the 25 slowest tests close the report, for whoever makes the suite faster next.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25 $(ARGS)

# ruff's rules and its formatter, then mypy over fedsim/, clients/ and strategies/ ([tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

setup: $(STAMP)

# torch is pinned first on its own: `pip install torch==2.13.0` takes the CPU wheel on disk; an
# unpinned torch would pull several GB of CUDA packages. Everything else is pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The same app through Flower's own CLI: `flwr run .` on a SuperLink of the run's own (a free
# port, a Flower home in .flwr/run-*), started in this venv (no per-run `uv sync`, which would
# fetch a CUDA build of torch) and stopped by its process id afterwards: concurrent runs never
# share or stop each other's. OVERRIDES="num_rounds=5 ...".
OVERRIDES ?=
RESULTS_DIR ?= results/runs
flwr-run: $(STAMP)
	$(BIN)/python -m fedsim.scripts.flwr_run --overrides "$(OVERRIDES)" --results-dir "$(RESULTS_DIR)"

# What a lent GPU machine needs for issue 17's check, in one device call (needs the package
# registry): .gpu/bundle.tar.xz. Then, with the device tool: carry .gpu, run scripts/gpu_check.sh.
gpu-bundle: $(STAMP)
	$(BIN)/python scripts/gpu_bundle.py

clean-venv:
	rm -rf $(VENV)
