"""TorchServe handler for the xray model: PNG/JPEG/.npy/DICOM chest X-ray -> pneumonia prediction.

BaseHandler's contract, each stage with its usual meaning, and BaseHandler.handle itself (so
TorchServe's HandlerTime and its `@timed` profiling, `handler: {profile: true}`, stay):

    preprocess   the batch's raw requests -> one XrayRequest each (handlers/request.py): decoded
                 model input, explain target, or its own 4xx error
    inference    one forward pass over the valid inputs; Grad-CAM for those that asked for it
    postprocess  each request -> its JSON body and HTTP status

A bad request is answered alone and never harms its batch-mates. A batch may mix predictions
and explanations (TorchServe's explain_handle looks at the first request only: here it takes
the same path). Threshold, classes and preprocessing come from the ModelCard inside the model file.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from ts.handler_utils.timer import timed
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers.backends import load_runner, pneumonia_probability
from handlers.explain import NotExplainable, grad_cam, load_explainer, overlay_png
from handlers.request import XrayRequest, read_request
from handlers.schemas import Explanation, Prediction

log = logging.getLogger(__name__)


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
        self.context, self.manifest = context, context.manifest  # BaseHandler's profiler reads the manifest
        self.initialized = True

    @timed
    def preprocess(self, data: list[dict]) -> list[XrayRequest]:
        t0 = time.perf_counter()
        requests = [read_request(i, raw, self.context.get_all_request_header(i) or {}, self.card)
                    for i, raw in enumerate(data)]
        for r in requests:
            if r.ok and r.explain and self.explainer is None:
                r.refuse(422, "not_explainable", self.not_explainable)
        self._metric("XrayPreprocessMs", (time.perf_counter() - t0) * 1000, "ms", MetricTypes.GAUGE)
        return requests

    @timed
    def inference(self, requests: list[XrayRequest], *args: Any, **kwargs: Any) -> list[XrayRequest]:
        good = [r for r in requests if r.ok]
        if good:
            t0 = time.perf_counter()
            logits = self.runner(np.stack([r.image for r in good]))
            for r, p in zip(good, pneumonia_probability(logits, self.card.head), strict=True):
                r.probability = float(p)
            self._metric("XrayInferenceMs", (time.perf_counter() - t0) * 1000, "ms", MetricTypes.GAUGE)
            self._explain([r for r in good if r.explain])
        bad = len(requests) - len(good)
        self._metric("XrayBatchSize", len(requests), "count", MetricTypes.GAUGE)
        self._metric("XrayBatches", 1, "count", MetricTypes.COUNTER)
        self._metric("XrayRequests", len(requests), "count", MetricTypes.COUNTER)
        self._metric("XrayBadRequests", bad, "count", MetricTypes.COUNTER)
        log.info("batch of %d: %d predicted, %d refused", len(requests), len(good), bad)
        return requests

    @timed
    def postprocess(self, requests: list[XrayRequest]) -> list[dict]:
        out = []
        for r in requests:
            body = self._answer(r)
            code = r.error.code if r.error else 200
            self.context.set_response_status(code, HTTPStatus(code).phrase, r.index)
            self.context.set_response_content_type(r.index, "application/json")
            out.append(body)
        return out

    def explain_handle(self, data_preprocess: list[XrayRequest], raw_data: list[dict]) -> list[dict]:
        # BaseHandler.handle comes here when the batch's FIRST request asks for an explanation;
        # each request carries its own choice, so both paths are the same.
        return self.postprocess(self.inference(data_preprocess))

    def _explain(self, requests: list[XrayRequest]) -> None:
        """Grad-CAM heatmaps for the requests that asked, for their target or their predicted class."""
        if not requests:
            return
        t0 = time.perf_counter()
        for r in requests:
            if r.target is None:
                r.target = int(r.probability >= self.card.threshold)
        try:
            cams = grad_cam(self.explainer, np.stack([r.image for r in requests]), self.card.head,
                            [r.target for r in requests], self.runner.device)
        except Exception as exc:  # the predictions of the batch stand; only these requests fail
            log.exception("Grad-CAM failed for %d requests", len(requests))
            for r in requests:
                r.refuse(500, "internal_error", f"explanation failed: {exc}")
            return
        for r, cam in zip(requests, cams, strict=True):
            r.heatmap = cam
        self._metric("XrayExplainMs", (time.perf_counter() - t0) * 1000, "ms", MetricTypes.GAUGE)

    def _answer(self, r: XrayRequest) -> dict:
        if r.error:
            return r.error.model_dump()
        names = self.card.class_names
        p = r.probability
        prediction = Prediction(label=names[int(p >= self.card.threshold)], probability=p,
                                probabilities={names[0]: 1.0 - p, names[1]: p}, threshold=self.card.threshold,
                                model=self.card.name, version=self.version, backend=self.runner.backend,
                                device=self.runner.device)
        if not r.explain:
            return prediction.model_dump()
        gray = r.image[0] * self.card.std + self.card.mean  # back to the [0, 1] image the model saw
        return Explanation(prediction=prediction, target=names[r.target], heatmap=np.round(r.heatmap, 4).tolist(),
                           overlay_png=overlay_png(gray, r.heatmap)).model_dump()

    def _metric(self, name: str, value: float, unit: str, kind: MetricTypes) -> None:
        self.context.metrics.add_metric(name, round(float(value), 3), unit, None, [], kind)
