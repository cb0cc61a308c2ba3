"""TorchServe handler for the xray model: PNG/JPEG/.npy/DICOM chest X-ray -> pneumonia prediction.

BaseHandler's contract, each stage with its usual meaning, and BaseHandler.handle itself (so
TorchServe's `@timed` profiling, `handler: {profile: true}`, stays; inside a TorchServe worker
handlers/worker.py drops its per-batch HandlerTime gauge unless profiling is on):

    preprocess   the batch's raw requests -> one XrayRequest each (handlers/request.py): decoded
                 model input, explain target, or its own 4xx error
    inference    one forward pass over the valid inputs: logits and the OOD score; the calibrated
                 probability; images above the OOD threshold refused (422 not_chest_xray);
                 Grad-CAM for the rest that asked for it
    postprocess  each request -> its JSON body and HTTP status; the label is the calibrated
                 probability against the threshold of the operating point the request chose

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

from handlers.backends import load_runner
from handlers.explain import NotExplainable, grad_cam, load_explainer, overlay_png
from handlers.request import XrayRequest, read_request
from handlers.schemas import Explanation, Prediction
from handlers.trust import calibrated, is_foreign, label_of, margin_of
from handlers.worker import tune_worker

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
        log.info("xray %s: backend=%s device=%s providers=%s input=%dpx points=%s calibration=%s ood=%s",
                 self.version, self.runner.backend, self.runner.device, getattr(self.runner, "providers", "-"),
                 self.card.input_size, {k: round(v.threshold, 4) for k, v in self.card.operating_points.items()},
                 self.card.calibration, self.card.ood)
        self.explainer, self.not_explainable = None, "this archive carries no explainer model"
        if settings.get("explainer") and (Path(props["model_dir"]) / settings["explainer"]).is_file():
            try:
                self.explainer = load_explainer(Path(props["model_dir"]) / settings["explainer"], self.runner.device)
            except NotExplainable as exc:
                self.not_explainable = str(exc)
        self.context, self.manifest = context, context.manifest  # BaseHandler's profiler reads the manifest
        log.info("worker tuning: %s", tune_worker(profiling=bool(settings.get("profile"))))
        self.initialized = True

    @timed
    def preprocess(self, data: list[dict]) -> list[XrayRequest]:
        t0 = time.perf_counter()
        requests = [read_request(i, raw, self.context.get_all_request_header(i) or {}, self.card)
                    for i, raw in enumerate(data)]
        for r in requests:
            if r.ok and r.explain and self.explainer is None:
                r.refuse(422, "not_explainable", self.not_explainable)
        self._metric("XrayPreprocessSeconds", time.perf_counter() - t0, "s", MetricTypes.HISTOGRAM)
        return requests

    @timed
    def inference(self, requests: list[XrayRequest], *args: Any, **kwargs: Any) -> list[XrayRequest]:
        good = [r for r in requests if r.ok]
        if good:
            t0 = time.perf_counter()
            logits, scores = self.runner.run(np.stack([r.image for r in good]))
            probs = calibrated(margin_of(logits, self.card.head), self.card.calibration)
            for k, r in enumerate(good):
                r.probability = float(probs[k])
                r.ood_score = None if scores is None else float(scores[k])
                if r.ood_score is not None and is_foreign(r.ood_score, self.card.ood):
                    r.refuse(422, "not_chest_xray", "this image does not look like a chest radiograph the model "
                             "was trained on: no diagnosis is given", ood_score=r.ood_score,
                             ood_threshold=self.card.ood.threshold)
            self._metric("XrayInferenceSeconds", time.perf_counter() - t0, "s", MetricTypes.HISTOGRAM)
            self._explain([r for r in good if r.explain and r.ok])
        foreign = sum(1 for r in good if r.error is not None and r.error.type == "not_chest_xray")
        if foreign:
            self._metric("XrayOodRefused", foreign, "count", MetricTypes.COUNTER)
        bad = len(requests) - len(good)
        # Its _count is the number of batches and its _sum the number of requests.
        self._metric("XrayBatchSize", len(requests), "count", MetricTypes.HISTOGRAM)
        if bad:
            self._metric("XrayBadRequests", bad, "count", MetricTypes.COUNTER)
        log.debug("batch of %d: %d predicted, %d refused, %d not chest radiographs", len(requests),
                  len(good) - foreign, bad, foreign)
        return requests

    @timed
    def postprocess(self, requests: list[XrayRequest]) -> list[bytes]:
        out = []
        for r in requests:
            code = r.error.code if r.error else 200
            self.context.set_response_status(code, HTTPStatus(code).phrase, r.index)
            self.context.set_response_content_type(r.index, "application/json")
            # Bytes go out as they are (a dict would be pretty-printed by TorchServe, json.dumps
            # indent=2); pydantic's serializer writes compact JSON faster than json.dumps.
            out.append(self._answer(r))
        return out

    def explain_handle(self, data_preprocess: list[XrayRequest], raw_data: list[dict]) -> list[bytes]:
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
                r.target = int(r.probability >= r.threshold)
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
        self._metric("XrayExplainSeconds", time.perf_counter() - t0, "s", MetricTypes.HISTOGRAM)

    def _answer(self, r: XrayRequest) -> bytes:
        if r.error:
            return r.error.model_dump_json(exclude_none=True).encode()
        names = self.card.class_names
        p = r.probability
        prediction = Prediction(label=label_of(p, r.threshold, names), probability=p,
                                probabilities={names[0]: 1.0 - p, names[1]: p}, threshold=r.threshold,
                                operating_point=r.point, ood_score=r.ood_score, model=self.card.name,
                                version=self.version, backend=self.runner.backend, device=self.runner.device)
        if not r.explain:
            return prediction.model_dump_json().encode()
        gray = r.image[0] * self.card.std + self.card.mean  # back to the [0, 1] image the model saw
        return Explanation(prediction=prediction, target=names[r.target], heatmap=np.round(r.heatmap, 4).tolist(),
                           overlay_png=overlay_png(gray, r.heatmap)).model_dump_json().encode()

    def _metric(self, name: str, value: float, unit: str, kind: MetricTypes) -> None:
        # Each call is one stdout line that the Java frontend parses: few per batch, none per request.
        self.context.metrics.add_metric(name, round(float(value), 6), unit, None, [], kind)
