# Brain-MRI MLOps workflow: the front door. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
MLFLOW ?=
MLFLOW_PORT ?= 5000
PIPELINE_YAML := pipelines/brain_mri_pipeline.yaml
PYTORCHJOB_YAML := manifests/training/pytorchjob.yaml
ISVC_YAML := manifests/serving/inferenceservice.yaml
REGISTRY ?= ghcr.io/brain-mri-mlops
TAG ?= 0.1.0
COMPONENT_IMAGE ?= $(REGISTRY)/components:$(TAG)
SERVING_IMAGE ?= $(REGISTRY)/predictor:$(TAG)
DOCKER ?= docker
CLUSTER_YAML ?= build/brain_mri_pipeline.yaml
GPU ?=
CLUSTER_FLAGS = --image $(COMPONENT_IMAGE) --default-serving-image $(SERVING_IMAGE) $(if $(GPU),--gpu)
# Debian packages the local runs use when present (the component image installs them too)
DEBIAN_PACKAGES := libtcmalloc-minimal4
# what only the tests use: a real browser renders the HTML run report (tests/test_html_report.py);
# a real PACS, Orthanc with DICOMweb, is the DICOMweb source (tests/test_pacs.py)
TEST_DEBIAN_PACKAGES := chromium orthanc orthanc-dicomweb
# training's malloc, as in the component image: tcmalloc steps 1.10x glibc's at 1/70 of its page
# faults (benchmarks/results/allocators.json); recursive, so it sees what debian-packages installed
TCMALLOC_LIB = $(firstword $(wildcard /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4))
ON_TCMALLOC = $(if $(TCMALLOC_LIB),LD_PRELOAD=$(TCMALLOC_LIB))

.PHONY: help venv run mlflow-ui test test-unit lint format compile manifests clean images cluster-yaml upload \
	debian-packages bench bench-ingest bench-accuracy bench-serve bench-load bench-reliability bench-step bench-allocator bench-train-speed bench-trust bench-front credentials

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package with its dev tools (once)

debian-packages: ## install DEBIAN_PACKAGES with apt-get when missing and run as root; else say what is missing
	@missing=$$(for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $$missing"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	    || echo "apt-get failed: runs go on without $$missing"; \
	else echo "optional Debian packages missing: $$missing (sudo apt-get install $$missing); runs go on without them"; fi

run: $(STAMP) debian-packages ## demo end to end: local S3, pipeline via kfp.local, KServe server, one query (DATA=folder|s3://bucket/prefix, MLFLOW=1: tracked in a local MLflow)
	$(BIN)/python -m pipelines.quickstart $(if $(DATA),--data "$(DATA)") $(if $(filter-out 0,$(MLFLOW)),--mlflow) --mlflow-port $(MLFLOW_PORT)

mlflow-ui: $(STAMP) ## serve the local MLflow UI on the runs `make run MLFLOW=1` tracked (MLFLOW_PORT=5000), until Ctrl-C
	$(BIN)/python -m pipelines.quickstart --mlflow-ui --mlflow-port $(MLFLOW_PORT)

test: $(STAMP) debian-packages ## run the test suite (unit and integration tests)
	@$(MAKE) --no-print-directory debian-packages DEBIAN_PACKAGES="$(TEST_DEBIAN_PACKAGES)"
	$(BIN)/python -m pytest

test-unit: $(STAMP) ## only the unit tests: no server, subprocess or kfp.local run (well under a minute)
	$(BIN)/python -m pytest -m unit

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

compile: $(STAMP) ## write the committed generated files: pipeline YAML (default images), PyTorchJob and InferenceService examples
	env -u COMPONENT_IMAGE $(BIN)/python -m pipelines compile --output $(PIPELINE_YAML)
	env -u COMPONENT_IMAGE $(BIN)/python -m components.train_job --example > $(PYTORCHJOB_YAML)
	env -u COMPONENT_IMAGE $(BIN)/python -m components.promote --example > $(ISVC_YAML)

images: ## build the component and predictor images as COMPONENT_IMAGE / SERVING_IMAGE (REGISTRY=, TAG=)
	@$(DOCKER) info >/dev/null 2>&1 || { \
	  echo "no Docker engine: '$(DOCKER) info' failed, so no image was built."; \
	  echo "Start one (or set DOCKER_HOST / DOCKER=podman), or build elsewhere with:"; \
	  echo "  docker build -f components/Dockerfile -t $(COMPONENT_IMAGE) ."; \
	  echo "  docker build -f serving/Dockerfile -t $(SERVING_IMAGE) ."; \
	  exit 1; }
	$(DOCKER) build -f components/Dockerfile -t $(COMPONENT_IMAGE) .
	$(DOCKER) build -f serving/Dockerfile -t $(SERVING_IMAGE) .
	@echo "built $(COMPONENT_IMAGE) and $(SERVING_IMAGE)"
	@echo "next: $(DOCKER) push both, then make cluster-yaml (or make upload) with the same REGISTRY/TAG"

cluster-yaml: $(STAMP) ## compile for your cluster: your images, GPU=1 for a GPU train step (writes CLUSTER_YAML)
	$(BIN)/python -m pipelines compile --output $(CLUSTER_YAML) $(CLUSTER_FLAGS)

upload: $(STAMP) ## upload a new pipeline version to KFP (KFP_HOST, KFP_TOKEN; your images; GPU=1)
	$(BIN)/python -m pipelines upload $(CLUSTER_FLAGS)

credentials: $(STAMP) ## write manifests/base/credentials/*.env with random values (one MinIO user per consumer; existing files kept)
	$(BIN)/python -m brainmri.manifests credentials

manifests: $(STAMP) ## render the kustomize overlays with the bundled kubectl (refuses missing, placeholder or shared credentials)
	$(BIN)/python -m brainmri.manifests render manifests/overlays/*/

bench: bench-ingest bench-accuracy bench-serve bench-load bench-reliability bench-step bench-allocator bench-train-speed bench-trust ## every benchmark (figures in benchmarks/results/*.json)

bench-ingest: $(STAMP) ## ingest the real data set (../shared/data/brain-mri/Training); target well under 1 min
	$(BIN)/python -m benchmarks.bench_ingest

bench-serve: $(STAMP) ## serving benchmark: model server under load vs raw forward (writes benchmarks/results/serve.json)
	$(BIN)/python -m benchmarks.bench_serve

bench-load: $(STAMP) ## load test: 10,000 mixed valid/hostile requests at concurrency 32 on the trained model (writes benchmarks/results/load.json; needs bench-accuracy's model)
	$(BIN)/python -m benchmarks.bench_load $(BENCH_ARGS)

bench-reliability: $(STAMP) ## run every fault-injection test of the reliability table (writes benchmarks/results/reliability.json)
	$(BIN)/python -m benchmarks.bench_reliability

bench-step: $(STAMP) debian-packages ## training-step levers against each other in one process (writes benchmarks/results/step_levers.json)
	$(ON_TCMALLOC) $(BIN)/python -m benchmarks.bench_step

bench-allocator: $(STAMP) ## the training step under glibc malloc, jemalloc and tcmalloc, each in its own process: images/s and page faults (writes benchmarks/results/allocators.json; needs apt libjemalloc2 libtcmalloc-minimal4)
	$(BIN)/python -m benchmarks.bench_allocator

bench-train-speed: $(STAMP) debian-packages ## whole training epochs on real slices, old recipe vs new (augmentation per sample or batched, glibc or tcmalloc), each in its own process (writes benchmarks/results/train_speed.json)
	$(BIN)/python -m benchmarks.bench_train_speed

bench-accuracy: $(STAMP) debian-packages ## accuracy benchmark on ../shared/data/brain-mri/Training, ~40 min on 2 idle CPU cores (BENCH_ARGS="--smoke" for a quick check)
	$(ON_TCMALLOC) $(BIN)/python -m benchmarks.bench_accuracy $(BENCH_ARGS)

bench-trust: $(STAMP) ## calibration, prediction sets, flags, OOD detection and explain latency of the trained model on the held-out, shifted and non-MRI sets; pointing game on demo data (writes benchmarks/results/trust.json; needs bench-accuracy's model; BENCH_ARGS="--smoke" for a quick check)
	$(BIN)/python -m benchmarks.bench_trust $(BENCH_ARGS)

bench-front: $(STAMP) ## every measured recipe (benchmarks/results/recipes/*.json) against the default: table and time-accuracy front (levers.md, front.svg)
	$(BIN)/python -m benchmarks.front

clean: ## remove run outputs (keeps .venv)
	rm -rf .run local_outputs .pytest_cache
