# xray-serve: data -> training -> export -> model_store -> TorchServe handler -> client.
SHELL := /bin/bash
PY_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export DATA_DIR ?= $(abspath ../shared/data/chest_xray)
# The CPU torch wheel lives in the machine's wheel folder; never let pip fetch CUDA torch.
WHEELS ?= /opt/wheels
PIP_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
URL ?= http://127.0.0.1:8080
SPLIT ?= test
BACKEND ?= onnxruntime

.PHONY: setup java test lint train experiments export archive serve stop evaluate bench soak clean help

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: java $(VENV)/.installed ## create .venv and install everything, pinned
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_LINKS) -r requirements.lock
	$(PY) -c "import torch, onnxruntime, ts; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

java: ## install a Java 17 runtime with apt-get where java is missing (TorchServe's frontend)
	@command -v java >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }
	@java -version 2>&1 | head -1

test: setup ## lint, then the whole test suite (starts a real TorchServe)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: ## ruff
	$(VENV)/bin/ruff check .

train: setup ## train the default set; best BCE-MLP, CE-MLP and CNN -> artifacts/best/
	$(PY) -m training.experiments --study default

experiments: setup ## every course study -> reports/experiments.md (QUICK=1 for the CI-sized grids)
	$(PY) -m training.experiments --study all $(if $(QUICK),--quick,)

export: setup ## TorchScript + ONNX for the best checkpoints, with the parity report
	$(PY) -m export

archive: setup ## pack model_store/xray.mar (BACKEND=onnxruntime|torchscript)
	$(PY) -m export.archive --backend $(BACKEND)

serve: setup ## start TorchServe in the background; returns once a real prediction succeeds
	$(PY) -m serving.launcher start

stop: setup ## stop TorchServe
	$(PY) -m serving.launcher stop

evaluate: setup ## every image of SPLIT through the live endpoint -> reports/evaluate/
	$(PY) -m serving.evaluate --url $(URL) --split $(SPLIT) $(if $(EXPECT),--expect $(EXPECT),)

bench: setup ## in-process limit vs live endpoint at concurrency 1/8/32/64 -> reports/bench.md
	$(PY) -m serving.bench

clean: ## remove build outputs (keeps .venv and the data cache)
	rm -rf artifacts/runs artifacts/best artifacts/export model_store/*.mar reports logs .serve
