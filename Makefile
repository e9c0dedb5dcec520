# nasforge: two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nasforge-installed
PARAMS ?= params.yaml
PYTEST_ARGS ?=

.PHONY: install run test test-fast test-container lint format compile images images-gpu bench-search bench-serve bench-darts bench-compress bench-coverage bench-memory clean

# torch first, pinned to the CPU build (a looser pin pulls the CUDA wheels), then the project.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,openvino,serve,executorch]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: the full pipeline with kfp.local on the embedded digits dataset.
run: install
	$(BIN)/nasforge run --params $(PARAMS)

## The whole test suite (unit, integration: kfp.local, dvc repro, mlflow server; end to end),
## one worker per core (pytest-xdist), each test file on one worker, the longest files first.
## Container tests build a 2.2 GB image (~10 min with podman) and run with `make test-container`.
TEST_WORKERS ?= auto
test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not container" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## Build the CPU image with podman/docker and run real stages in it (skips if neither can run).
test-container: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m container $(PYTEST_ARGS)

## Unit tests only (seconds).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not container" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src components pipelines tests benchmarks
	$(BIN)/ruff format --check src components pipelines tests benchmarks

format: install
	$(BIN)/ruff format src components pipelines tests benchmarks
	$(BIN)/ruff check --fix src components pipelines tests benchmarks

## Recompile the committed KFP IR YAML (a test checks it is up to date).
compile: install
	NASFORGE_IMAGE= NASFORGE_GPU_IMAGE= $(BIN)/nasforge pipeline compile --targets onnxruntime-cpu,openvino-cpu,tensorrt-gpu --output pipelines/compiled/nasforge_pipeline.yaml

## Container images (docker or podman, whichever can run).
images: install
	bash scripts/build_images.sh cpu

images-gpu: install
	bash scripts/build_images.sh gpu

## Search strategies on NAS-Bench-201 (issue 3 benchmark).
bench-search: install
	$(BIN)/python benchmarks/bench_search_nb201.py

## Serving: batch 1 vs dynamic batching vs variant switching vs early exit (issue 6).
## Trains the served models on digits (untimed), then times under the shared benchmark lock.
bench-serve: install
	$(BIN)/python benchmarks/bench_serve.py --phase prepare --models-dir /tmp/nasforge-bench-serve
	flock /tmp/nasforge-bench.lock nice -n 5 $(BIN)/python benchmarks/bench_serve.py --phase run --models-dir /tmp/nasforge-bench-serve

## Compression on CIFAR-10 (issue 5 benchmark): training at nice 10, timing under the shared lock.
bench-compress: install
	nice -n 10 $(BIN)/python benchmarks/bench_compress.py --phase train --work /tmp/nasforge-bench-compress
	flock /tmp/nasforge-bench.lock nice -n 5 $(BIN)/python benchmarks/bench_compress.py --phase measure --work /tmp/nasforge-bench-compress

## DARTS on the NAS-Bench-201 cell with and without the anti-collapse measures (issue 3).
bench-darts: install
	$(BIN)/python benchmarks/bench_darts.py --seeds 3

## Every connected NB201 cell (15,284) and 2,000 macro specs through prune -> forward, 500 of each
## through prune -> QAT -> export -> ONNX Runtime / OpenVINO; resumable (checkpoint in benchmarks/results/space_coverage_run/).
bench-coverage: install
	nice -n 10 $(BIN)/python benchmarks/bench_space_coverage.py

## The search's memory objective (model) against measured peak RSS, per CPU runtime.
bench-memory: install
	$(BIN)/python benchmarks/bench_memory_model.py

clean:
	rm -rf runs artifacts mlflow.db mlartifacts .dvcstore
