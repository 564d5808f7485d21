# mtp-mlx developer targets. `make setup` then `make test` on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FIXTURES ?= fixtures
PROMPT ?= def fibonacci(n):

.PHONY: setup test fixtures demo bench tune lint check-kernels clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU torch (the reference's backend) first, pinned, so pip never pulls a CUDA build.
setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

fixtures:
	$(BIN)/python scripts/make_fixtures.py --out $(FIXTURES)

# The main job on the small checkpoint pair that `make fixtures` builds.
demo: fixtures
	$(BIN)/mtp-mlx generate --model $(FIXTURES)/agree/target --drafter $(FIXTURES)/agree/assistant \
		--prompt "$(PROMPT)" --max-tokens 64 --raw

# Everything CI runs: the test suite (fixtures are built on first use), then the kernel checker.
test:
	$(BIN)/python -m pytest
	$(BIN)/python kernels/check_kernels.py

check-kernels:
	$(BIN)/python kernels/check_kernels.py

tune: fixtures
	$(BIN)/pip install -q matplotlib
	$(BIN)/mtp-mlx tune --model $(FIXTURES)/agree/target --drafter $(FIXTURES)/agree/assistant --out tuning

bench: fixtures
	$(BIN)/python scripts/bench.py --model $(FIXTURES)/agree/target --drafter $(FIXTURES)/agree/assistant

lint:
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check mtp_mlx scripts tests kernels

clean:
	rm -rf $(FIXTURES) .pytest_cache build *.egg-info kernels/.build
