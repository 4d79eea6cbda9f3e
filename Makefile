# Everyday commands; `make help` lists them. Every target calls the `catsdogs` CLI or a standard tool.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Data source: empty means params.yaml's data_source (the public download); SOURCE=path or URL overrides.
SOURCE ?=
SOURCE_FLAG := $(if $(SOURCE),--source $(SOURCE))
# Extras installed beside train, serve and dev (comma-separated; `make setup EXTRAS=` for none):
# ray runs `catsdogs predict-batch --engine ray` and its tests.
EXTRAS ?= ray

.DEFAULT_GOAL := help
.PHONY: help setup install lint format test test-fast data train serve bench check-monitoring image stack manifests

help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

setup: ## Set up this machine (Debian/Ubuntu): system packages (root or sudo), .venv, tools, base image.
	VENV=$(VENV) EXTRAS=$(EXTRAS) scripts/setup.sh

install: ## Only the Python part of `make setup`: the package with every extra into .venv (CPU torch).
	VENV=$(VENV) EXTRAS=$(EXTRAS) scripts/setup.sh venv

$(PY):
	@echo "$(VENV) does not exist yet: run 'make setup' (or 'make install') first" >&2; exit 1

lint: $(PY) ## Lint and check formatting (ruff).
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: ## Fix lint and formatting where ruff can.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Tests find the venv's tools (dvc, hadolint, kubectl, ...) on PATH, as in an activated venv.
RUN := PATH="$(abspath $(BIN)):$$PATH"

test: lint ## The full check CI runs: lint, then every test (unit, data, model, API, integration, tools).
	$(RUN) $(BIN)/pytest

test-fast: $(PY) ## Only the quick tests (no `slow` or `integration` marker).
	$(RUN) $(BIN)/pytest -m "not slow and not integration"

data: ## Fetch the dataset once (verified; SOURCE=path or URL) and ingest it into data/.
	$(BIN)/catsdogs data fetch $(SOURCE_FLAG)
	$(BIN)/catsdogs data ingest $(SOURCE_FLAG)

train: ## Train with params.yaml and register the model.
	$(BIN)/catsdogs train

serve: ## Serve the champion model on 127.0.0.1:8000.
	$(BIN)/catsdogs serve

BUNDLE ?= runs/efficientnet_lite2-finetune/bundle

bench: ## Full-size benchmarks (minutes): ingest → train → evaluate from nothing, then serving BUNDLE.
	$(PY) benchmarks/bench_pipeline.py $(SOURCE_FLAG)
	$(PY) benchmarks/bench_serve.py --bundle $(BUNDLE)

check-monitoring: ## Check the Prometheus rules and config, run the rules' unit tests, check Alertmanager's config.
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml
	promtool check config deploy/prometheus/prometheus.yml
	amtool check-config deploy/alertmanager/alertmanager.yml

.PHONY: demo
demo: ## Five-minute demo: fetch the data, train `head` on a sample, promote, serve the page (Ctrl-C stops).
	$(BIN)/catsdogs quickstart $(DEMO_ARGS)

.PHONY: promote mlflow-ui
promote: ## Move `champion` to the challenger if it passes the quality gate.
	$(BIN)/catsdogs promote

mlflow-ui: ## Browse runs and registered models on http://127.0.0.1:5000.
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1

IMAGE ?= localhost/catsdogs-serve:dev
ENGINE ?= podman

image: ## Build the serving image (IMAGE=name:tag, ENGINE=podman|docker); docs/deployment.md.
	$(ENGINE) build -f docker/serve.Dockerfile -t $(IMAGE) .

stack: ## Start the whole stack with docker compose (API, MLflow, Prometheus, Alertmanager, Grafana).
	docker compose up -d --build

manifests: ## Render the Kubernetes overlays (OVERLAY=local|production).
	kubectl kustomize deploy/k8s/overlays/$(or $(OVERLAY),local)
