# xray-serve: data -> training -> export -> model_store -> TorchServe handler -> client.
SHELL := /bin/bash
PY_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export DATA_DIR ?= $(abspath ../shared/data/chest_xray)
# The CPU torch wheel lives in the machine's wheel folder; never let pip fetch CUDA torch.
WHEELS ?= /opt/wheels
PIP_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
# Deployment constants (model name, ports, paths) come from their one home, handlers/constants.py.
CONST = $(shell python3 -m handlers.constants $(1))
URL ?= $(call CONST,INFERENCE_URL)
SPLIT ?= test
BACKEND ?= onnxruntime

.PHONY: setup java nginx chaos test test-fast lint train experiments export archive serve stop evaluate \
	evaluate-offline predict-offline ood bench soak clean help \
	docker-build docker-run docker-test deploy-check deploy-render

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: java nginx $(VENV)/.installed ## create .venv and install everything, pinned (+ Java 17 and nginx via apt-get)
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_LINKS) -r requirements.lock
	$(PY) -c "import torch, onnxruntime, ts; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

nginx: ## install nginx-light with apt-get where nginx is missing (the gateway in front of TorchServe)
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; }
	@$$(command -v nginx || echo /usr/sbin/nginx) -v

java: ## install a Java 17 runtime with apt-get where java is missing (TorchServe's frontend)
	@command -v java >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }
	@java -version 2>&1 | head -1

test: setup ## lint, then the whole test suite (starts a real TorchServe)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: setup ## lint, then every test that neither trains nor serves (< 1 min)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not server and not slow and not pipeline"

lint: ## ruff
	$(VENV)/bin/ruff check .

# NPROC=N: every run data-parallel over N processes (torchrun; gloo on CPU, NCCL on CUDA).
TORCHRUN = $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC)
train: setup ## train the default set; best BCE-MLP, CE-MLP and XrayNet -> artifacts/best/ (NPROC=N: data-parallel)
	$(if $(NPROC),$(TORCHRUN),$(PY)) -m training.experiments --study default

experiments: setup ## every course study, course settings, 3 seeds -> reports/experiments.md (QUICK=1: CI-sized)
	$(PY) -m training.experiments --study all --reuse $(if $(QUICK),--quick,)

export: setup ## TorchScript + ONNX for the best checkpoints, with the parity report
	$(PY) -m export

archive: setup ## pack model_store/xray.mar (BACKEND=onnxruntime|torchscript; WORKERS, THREADS, BATCH, DELAY)
	$(PY) -m export.archive --backend $(BACKEND) $(if $(WORKERS),--min-workers $(WORKERS) --max-workers $(WORKERS),) \
	  $(if $(THREADS),--threads $(THREADS),) $(if $(BATCH),--batch-size $(BATCH),) $(if $(DELAY),--max-batch-delay $(DELAY),)

serve: setup ## gateway + TorchServe, supervised, in the background; returns once the probe radiograph is answered
	$(PY) -m serving.launcher start

stop: setup ## drain in-flight requests, then stop the gateway and TorchServe
	$(PY) -m serving.launcher stop

evaluate: setup ## every image of SPLIT through the live endpoint -> reports/evaluate/
	$(PY) -m serving.evaluate --url $(URL) --split $(SPLIT) $(if $(EXPECT),--expect $(EXPECT),)

evaluate-offline: setup ## the same report with the handler in process, no server (MODEL=.mar|.onnx|checkpoint) -> reports/evaluate-offline/
	$(PY) -m serving.offline evaluate --split $(SPLIT) $(if $(MODEL),--model $(MODEL),) $(if $(EXPECT),--expect $(EXPECT),)

predict-offline: setup ## IMAGE=chest.jpeg: label, P(PNEUMONIA) and each class's confidence, no server (MODEL=...)
	@test -f "$(IMAGE)" || { echo "usage: make predict-offline IMAGE=path/to/chest.jpeg [MODEL=...] (no file '$(IMAGE)')" >&2; exit 2; }
	$(PY) -m serving.offline predict $(IMAGE) $(if $(MODEL),--model $(MODEL),)

ood: setup ## non-radiographs made by code, border cases and SPLIT's radiographs through the live endpoint -> reports/ood/
	$(PY) -m serving.ood_report --url $(URL) --split $(SPLIT)

bench: setup ## honest limit vs the live endpoint: closed + open loop, server CPU by role, profile -> reports/bench.md (QUICK=1; START=1 starts/stops the server; PORT_BASE=N)
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } \
	  || echo "wrk unavailable: the async httpx client loads the endpoint (it needs a core of its own)"
	$(PY) -m serving.bench $(if $(QUICK),--quick,) $(if $(START),--start,) $(if $(PORT_BASE),--port-base $(PORT_BASE),)

chaos: setup ## issue 12's attacks against the live server (`make serve` first) -> reports/chaos.md (QUICK=1: lighter)
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } \
	  || echo "wrk unavailable: the overload case is skipped"
	$(PY) -m serving.chaos $(if $(QUICK),--quick,)

soak: setup ## hold concurrency 64 against the live endpoint for MINUTES (default 10) -> reports/soak.json
	$(PY) -m serving.soak --url $(URL) --minutes $(or $(MINUTES),10) --concurrency 64

# --- container (Dockerfile, docker/) ---
IMAGE ?= $(call CONST,IMAGE)
# Debian's docker.io CLI has BuildKit built in; a newer CLI needs the buildx plugin for RUN --mount.
DOCKER ?= $(if $(wildcard /usr/bin/docker),/usr/bin/docker,docker)
BASE_IMAGE ?=
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt

docker-build: ## build IMAGE (CUDA 13 base, CPU torch from WHEELS); bakes model_store/xray.mar if present
	mkdir -p .whl && for w in $(WHEELS)/torch-2.13.0*cpu*.whl; do ln -f "$$w" .whl/ 2>/dev/null || cp "$$w" .whl/; done
	DOCKER_BUILDKIT=1 $(DOCKER) build --secret id=ca_bundle,src=$(CA_BUNDLE) \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE),) -t $(IMAGE) .

docker-run: ## run IMAGE on 127.0.0.1:8080-8082 (--gpus all where nvidia-smi works) and wait until healthy
	IMAGE=$(IMAGE) DOCKER=$(DOCKER) bash docker/run.sh

docker-test: setup ## (root) build on a local Debian base, run, predict real images through 127.0.0.1, clean up
	bash docker/smoke_test.sh

clean: ## remove build outputs (keeps .venv and the data cache)
	rm -rf $(call CONST,RUNS_DIR BEST_DIR EXPORT_DIR REPORTS_DIR LOG_DIR STATE_DIR) $(call CONST,MODEL_STORE)/*.mar

# --- Kubernetes / KServe (deploy/) ---
deploy-check: setup ## render deploy/ (cpu, gpu, kserve) and validate every object offline (Kubernetes + KServe schemas)
	$(PY) -m deploy.validate

deploy-render: setup ## print the manifests of OVERLAY (cpu, gpu) or deploy/kserve (OVERLAY=kserve)
	$(PY) -m deploy.kustomize $(if $(filter kserve,$(OVERLAY)),deploy/kserve,deploy/overlays/$(or $(OVERLAY),cpu))
