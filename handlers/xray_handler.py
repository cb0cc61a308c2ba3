"""TorchServe handler for the model "xray": PNG/JPEG/.npy chest X-ray -> pneumonia prediction.

TorchServe hands us a batch of requests. Each is decoded on its own: a bad one gets its own
4xx and a JSON ErrorBody, and its batch-mates are answered normally. The good ones go
through one forward pass. The threshold, classes and preprocessing come from the ModelCard
inside the model file, so nothing here is model-specific.
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers.backends import load_runner, pneumonia_probability
from handlers.batch import Batch, split_requests
from handlers.explain import NotExplainable, grad_cam, load_explainer, overlay_png
from handlers.schemas import ErrorBody, Explanation, Prediction

log = logging.getLogger(__name__)

TARGET_HEADER = "x-target-class"


class XrayHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        props = context.system_properties
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        model_file = Path(props["model_dir"]) / context.manifest["model"]["serializedFile"]
        gpu_id = props.get("gpu_id")  # None unless TorchServe found a GPU for this worker
        self.runner = load_runner(model_file, settings.get("backend"), gpu_id, int(settings.get("threads", 0)))
        self.card = self.runner.card
        self.version = str(context.manifest["model"].get("modelVersion", self.card.version))
        log.info("xray %s: backend=%s device=%s providers=%s input=%dpx threshold=%.4f", self.version,
                 self.runner.backend, self.runner.device, getattr(self.runner, "providers", "-"),
                 self.card.input_size, self.card.threshold)
        self.explainer, self.not_explainable = None, "this archive carries no explainer model"
        if settings.get("explainer") and (Path(props["model_dir"]) / settings["explainer"]).is_file():
            try:
                self.explainer = load_explainer(Path(props["model_dir"]) / settings["explainer"], self.runner.device)
            except NotExplainable as exc:
                self.not_explainable = str(exc)
        self.context = context
        self.initialized = True

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        # BaseHandler decides "explain or predict" from request 0 alone; a batch can mix both.
        self.context = context
        batch = self.inference(self.preprocess(data))
        out = self.postprocess(batch)
        wanted = [k for k, i in enumerate(batch.index) if context.get_request_header(i, "explain") == "True"]
        if wanted:
            self.explain_batch(batch, wanted, data, out)
        # Bytes go out as they are; a dict would be pretty-printed by TorchServe (json.dumps indent=2).
        return [json.dumps(body, separators=(",", ":")).encode() for body in out]

    def preprocess(self, requests: list[dict]) -> Batch:
        t0 = time.perf_counter()
        batch = split_requests(requests, self.card)
        self._metric("XrayPreprocessSeconds", time.perf_counter() - t0, "s", MetricTypes.HISTOGRAM)
        return batch

    def inference(self, batch: Batch, *args: Any, **kwargs: Any) -> Batch:
        if batch.inputs:
            t0 = time.perf_counter()
            logits = self.runner(np.stack(batch.inputs))
            batch.probability = pneumonia_probability(logits, self.card.head)
            self._metric("XrayInferenceSeconds", time.perf_counter() - t0, "s", MetricTypes.HISTOGRAM)
        # Its _count is the number of batches and its _sum the number of requests.
        self._metric("XrayBatchSize", batch.size, "count", MetricTypes.HISTOGRAM)
        if batch.errors:
            self._metric("XrayBadRequests", len(batch.errors), "count", MetricTypes.COUNTER)
        log.debug("batch of %d: %d predicted, %d refused", batch.size, len(batch.inputs), len(batch.errors))
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
            self._refuse(i, err, out)
        for i in range(batch.size):
            if i not in batch.errors:
                self.context.set_response_status(200, "OK", i)
            self.context.set_response_content_type(i, "application/json")
        return out

    def explain_batch(self, batch: Batch, wanted: list[int], requests: list[dict], out: list[dict]) -> None:
        """Replace the predictions of the requests that asked for it by a Grad-CAM explanation."""
        names = self.card.class_names
        ok, targets = [], []
        for k in wanted:
            i = batch.index[k]
            target = self._target(i, requests[i]) or out[i]["label"]
            if self.explainer is None:
                self._refuse(i, ErrorBody(code=422, type="not_explainable", message=self.not_explainable), out)
                continue
            if target.upper() not in names:
                message = f"target '{target}' is not one of {names}"
                self._refuse(i, ErrorBody(code=400, type="invalid_target", message=message), out)
                continue
            ok.append(k)
            targets.append(names.index(target.upper()))
        if not ok:
            return
        t0 = time.perf_counter()
        inputs = np.stack([batch.inputs[k] for k in ok])
        cams = grad_cam(self.explainer, inputs, self.card.head, targets, self.runner.device)
        for k, target, cam, x in zip(ok, targets, cams, inputs, strict=True):
            gray = x[0] * self.card.std + self.card.mean  # back to the [0, 1] image the model saw
            i = batch.index[k]
            out[i] = Explanation(prediction=Prediction.model_validate(out[i]), target=names[target],
                                 heatmap=np.round(cam, 4).tolist(), overlay_png=overlay_png(gray, cam)).model_dump()
        self._metric("XrayExplainSeconds", time.perf_counter() - t0, "s", MetricTypes.HISTOGRAM)

    def _target(self, i: int, request: dict) -> str | None:
        """The class to explain: multipart field 'target' or header X-Target-Class (TorchServe drops
        query parameters of raw-body requests)."""
        value = request.get("target")
        if value is None:
            headers = self.context.get_all_request_header(i) or {}
            value = next((v for k, v in headers.items() if str(k).lower() == TARGET_HEADER), None)
        return value.decode() if isinstance(value, bytes | bytearray) else value

    def _refuse(self, i: int, err: ErrorBody, out: list[dict]) -> None:
        self.context.set_response_status(err.code, HTTPStatus(err.code).phrase, i)
        out[i] = err.model_dump()

    def _metric(self, name: str, value: float, unit: str, kind: MetricTypes) -> None:
        # Each call is one stdout line that the Java frontend parses: few per batch, none per request.
        self.context.metrics.add_metric(name, round(float(value), 6), unit, None, [], kind)

