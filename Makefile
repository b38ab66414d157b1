# The two commands that work on a fresh machine:  make demo   (the main job)   and   make test   (the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup prereqs demo lint test bench clean

$(BIN)/selftrain: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	@touch $@

setup: $(BIN)/selftrain  ## create .venv and install selftrain with pinned dependencies

demo: setup  ## the main job: generate + version the demo dataset, then run PartDistillation on it
	$(BIN)/selftrain data generate
	$(BIN)/selftrain run configs/partdistillation-demo.yaml

prereqs:  ## system tools the tests need beyond Python (buildah + debootstrap for the image test; installs them as root)
	bash tests/k8s/image/prereqs.sh

lint: setup  ## ruff + the plane boundary (import-linter contracts in pyproject.toml); runs both, fails if either fails
	rc=0; $(BIN)/ruff check . || rc=1; $(BIN)/lint-imports --no-logo || rc=1; exit $$rc

test: setup prereqs lint  ## system prerequisites, lint, then the whole test suite (what CI runs)
	$(BIN)/python -m pytest

bench: setup  ## run the benchmarks behind BENCHMARKS.md
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf $(VENV) .pytest_cache
