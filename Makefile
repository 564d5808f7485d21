# mtp-mlx developer targets. `make setup` then `make test` on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FIXTURES ?= fixtures
PROMPT ?= def fibonacci(n):

.PHONY: setup test fixtures demo demo-pair bench tune lint check-kernels clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU torch (the reference's backend) first, pinned, so pip never pulls a CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,server]"

fixtures:
	$(BIN)/python scripts/make_fixtures.py --out $(FIXTURES)

# The main job, offline, on the bundled demonstration pair (mtp_mlx/demo).
demo:
	$(BIN)/mtp-mlx generate --prompt "$(PROMPT)" --max-tokens 128

# Retrain the bundled pair from scratch (about 70 minutes on 2 CPU cores; fixed seed and steps).
demo-pair:
	$(BIN)/python scripts/train_demo_pair.py

# Everything CI runs: the test suite (fixtures are built on first use), then the kernel checker.
test:
	$(BIN)/python -m pytest
	$(BIN)/python kernels/check_kernels.py

check-kernels:
	$(BIN)/python kernels/check_kernels.py

tune:
	$(BIN)/pip install -q matplotlib
	$(BIN)/mtp-mlx tune --out tuning

bench:
	$(BIN)/python scripts/bench.py --pair mtp_mlx/demo/target:mtp_mlx/demo/assistant

lint:
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check mtp_mlx scripts tests kernels

clean:
	rm -rf $(FIXTURES) .pytest_cache build *.egg-info kernels/.build
