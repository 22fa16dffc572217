# Set-up and checks. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
VERSION ?= 0.1.0

.PHONY: install test lint format demo bench bench-peers bench-adapters bench-operator bench-faults chart-crds images e2e cluster-build cluster-up cluster-down clean

install: $(INSTALLED)

$(INSTALLED): requirements-dev.txt operator/pyproject.toml inference_image/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on disk (any other version pulls CUDA packages).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt -e ./operator -e ./inference_image
	touch $(INSTALLED)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check operator inference_image tests benchmarks tools controlplane

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format operator inference_image tests benchmarks tools controlplane

# The main job on its embedded default: the demo model, rendered by the operator, served and chatted with.
demo: install
	$(PY) -m tools.demo

# Serving throughput and latency over HTTP: continuous batching vs the seed's approach (minutes).
bench: install
	$(PY) -m benchmarks.serving_bench

# bench's fixed scenario against llama-server (built once into ~/.cache/llmservice) and transformers serve.
bench-peers: install
	$(PY) -m benchmarks.peers_bench

# Adapters changed on running pods vs the pod rollout the same change took before (real control plane).
bench-adapters: install
	$(PY) -m benchmarks.adapter_bench

bench-operator: install
	$(PY) -m benchmarks.operator_bench

# The operator under injected API faults and 20 kills, 200 LLMServices at once: convergence time, retries.
bench-faults: install
	$(PY) -m benchmarks.operator_faults

# The chart's CRD template is generated from crds/ (a test fails when they differ).
chart-crds: install
	$(PY) tools/sync_chart_crds.py

# Both images, with docker (not available on every machine; CI here has no engine).
images:
	docker build -f operator/Dockerfile -t llmservice/operator:$(VERSION) .
	docker build -f inference_image/Dockerfile -t llmservice/inference:$(VERSION) .
	docker build -f inference_image/Dockerfile.cpu -t llmservice/inference:$(VERSION)-cpu .

# A real cluster end to end (docker, kind, kubectl, helm): see tests/e2e/run.sh.
e2e:
	bash tests/e2e/run.sh

# A real control plane on loopback, no Docker: etcd, kube-apiserver, controller-manager, scheduler and kwok's
# fake GPU nodes, built from Go modules (cached in ~/.cache/llmservice), the chart installed by helm and the
# operator running locally as the chart's ServiceAccount. State and .cluster/kubeconfig under .cluster/.
cluster-build:
	bash controlplane/build.sh

cluster-up: install
	$(PY) -m controlplane up --dir .cluster

cluster-down: install
	$(PY) -m controlplane down --dir .cluster

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .demo
