"""TorchServe handler for the model "xray": PNG/JPEG/.npy chest X-ray -> pneumonia prediction.

TorchServe hands us a batch of requests. Each is decoded on its own: a bad one gets its own
4xx and a JSON ErrorBody, and its batch-mates are answered normally. The good ones go
through one forward pass. The threshold, classes and preprocessing come from the ModelCard
inside the model file, so nothing here is model-specific.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers.backends import cuda_available, load_runner, pneumonia_probability
from handlers.batch import Batch, split_requests
from handlers.schemas import Prediction

log = logging.getLogger(__name__)


class XrayHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        props = context.system_properties
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        model_file = Path(props["model_dir"]) / context.manifest["model"]["serializedFile"]
        gpu_id = props.get("gpu_id") if cuda_available() else None
        self.runner = load_runner(model_file, settings.get("backend"), gpu_id, int(settings.get("threads", 0)))
        self.card = self.runner.card
        self.version = str(context.manifest["model"].get("modelVersion", self.card.version))
        log.info("xray %s: backend=%s device=%s providers=%s input=%dpx threshold=%.4f", self.version,
                 self.runner.backend, self.runner.device, getattr(self.runner, "providers", "-"),
                 self.card.input_size, self.card.threshold)
        self.context = context
        self.initialized = True

    def preprocess(self, requests: list[dict]) -> Batch:
        t0 = time.perf_counter()
        batch = split_requests(requests, self.card)
        self._metric("XrayPreprocessMs", (time.perf_counter() - t0) * 1000, "ms", MetricTypes.GAUGE)
        return batch

    def inference(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        if batch.inputs:
            t0 = time.perf_counter()
            logits = self.runner(np.stack(batch.inputs))
            batch.probability = pneumonia_probability(logits, self.card.head)
            self._metric("XrayInferenceMs", (time.perf_counter() - t0) * 1000, "ms", MetricTypes.GAUGE)
        self._metric("XrayBatchSize", batch.size, "count", MetricTypes.GAUGE)
        self._metric("XrayBatches", 1, "count", MetricTypes.COUNTER)
        self._metric("XrayRequests", batch.size, "count", MetricTypes.COUNTER)
        self._metric("XrayBadRequests", len(batch.errors), "count", MetricTypes.COUNTER)
        log.info("batch of %d: %d predicted, %d refused", batch.size, len(batch.inputs), len(batch.errors))
        return batch

    def postprocess(self, batch: Batch) -> list[dict]:
        out: list[dict] = [{}] * batch.size
        names = self.card.class_names
        for k, i in enumerate(batch.index):
            p = float(batch.probability[k])
            out[i] = Prediction(label=names[int(p >= self.card.threshold)], probability=p,
                                probabilities={names[0]: 1.0 - p, names[1]: p}, threshold=self.card.threshold,
                                model=self.card.name, version=self.version, backend=self.runner.backend,
                                device=self.runner.device).model_dump()
        for i, err in batch.errors.items():
            self.context.set_response_status(err.code, HTTPStatus(err.code).phrase, i)
            out[i] = err.model_dump()
        for i in range(batch.size):
            if i not in batch.errors:
                self.context.set_response_status(200, "OK", i)
            self.context.set_response_content_type(i, "application/json")
        return out

    def _metric(self, name: str, value: float, unit: str, kind: MetricTypes) -> None:
        self.context.metrics.add_metric(name, round(float(value), 3), unit, None, [], kind)

