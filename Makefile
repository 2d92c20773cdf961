# Brain-MRI MLOps workflow: the front door. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
PIPELINE_YAML := pipelines/brain_mri_pipeline.yaml

.PHONY: help venv run test lint format compile manifests clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package with its dev tools (once)

run: $(STAMP) ## demo end to end: local S3, pipeline via kfp.local, KServe server, one query (DATA=folder|s3://bucket/prefix)
	$(BIN)/python -m pipelines.quickstart $(if $(DATA),--data "$(DATA)")

test: $(STAMP) ## run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

compile: $(STAMP) ## write the pipeline YAML for the KFP UI
	$(BIN)/python -m pipelines compile --output $(PIPELINE_YAML)

manifests: $(STAMP) ## render the kustomize overlays with the bundled kubectl (needs manifests/base/minio.env)
	@test -f manifests/base/minio.env || { echo "manifests/base/minio.env missing: cp manifests/base/minio.env.example manifests/base/minio.env and set the credentials"; exit 1; }
	@for overlay in manifests/overlays/*/; do \
	  echo "# --- $$overlay"; \
	  $(BIN)/python -c "import sys; from brainmri.kubectl import kustomize_build; print(kustomize_build(sys.argv[1]))" $$overlay; \
	done

clean: ## remove run outputs (keeps .venv)
	rm -rf .run local_outputs .pytest_cache
