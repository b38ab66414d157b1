# The two commands that work on a fresh machine:  make demo   (the main job)   and   make test   (the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo lint cluster-build test image-check bench clean

$(BIN)/selftrain: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	@touch $@

setup: $(BIN)/selftrain  ## create .venv and install selftrain with pinned dependencies

demo: setup  ## the main job: generate + version the demo dataset, then run PartDistillation on it
	$(BIN)/selftrain data generate
	@# the val images without their part labels: the label-free selection criterion's held-out images (configs/partdistillation-demo.yaml)
	test -d data/partworld-demo-holdout/holdout || $(BIN)/selftrain data split data/partworld-demo/val --fractions holdout=1 --seed 0 -o data/partworld-demo-holdout
	$(BIN)/selftrain run configs/partdistillation-demo.yaml

lint: setup  ## ruff + the plane boundary (import-linter contracts in pyproject.toml); runs both, fails if either fails
	rc=0; $(BIN)/ruff check . || rc=1; $(BIN)/lint-imports --no-logo || rc=1; exit $$rc

cluster-build: setup  ## build the local control plane the Kubernetes tests start (cached; a cold machine's first build takes several minutes)
	PATH="$(abspath $(BIN)):$$PATH" tests/cluster/up --build-only

test: setup lint cluster-build  ## lint, build the local control plane, then the whole test suite (what CI runs)
	$(BIN)/python -m pytest

image-check: setup  ## build the image from the Dockerfile with buildah on a local base and run a demo stage in it (root; ~15 min cold)
	bash tests/k8s/image/prereqs.sh
	$(BIN)/python -m pytest -p no:cacheprovider tests/k8s/image/image_build_check.py

bench: setup  ## run the benchmarks behind BENCHMARKS.md
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf $(VENV) .pytest_cache
