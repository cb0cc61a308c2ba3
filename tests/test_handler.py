"""The TorchServe handler in process: a real ts.context.Context, as TorchServe's worker builds it.

The model is made here: a tiny ONNX graph (flatten + one dense layer, so the expected
probabilities are a line of numpy) and a tiny TorchScript XrayNet as the Grad-CAM explainer,
each carrying its ModelCard. Requests go through TorchServe's own
Service.retrieve_data_for_inference (wire format -> data list + per-request headers), then
BaseHandler.handle, as in the worker. Nothing is read from disk but what the test writes.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from ts.context import Context
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.service import Service

from export.torchscript import export_torchscript
from handlers import constants as C
from handlers.preprocess import preprocess
from handlers.schemas import ErrorBody, Explanation, ModelCard, Prediction
from handlers.xray_handler import XrayHandler
from tests.helpers import linear_onnx
from training.models import build_model

SIZE = 32
ARCH_ARGS = {"widths": [4, 4, 4, 4, 4]}
CARD = ModelCard(name="tiny", arch="xraynet", arch_args=ARCH_ARGS, head="ce", input_size=SIZE, mean=0.5, std=0.25,
                 threshold=0.5)
WEIGHTS = np.random.default_rng(0).normal(0, 0.05, (SIZE * SIZE, 2)).astype(np.float32)
METRICS_YAML = Path(__import__("ts").__file__).parent / "configs" / "metrics.yaml"


def tiny_onnx(path: Path) -> None:
    linear_onnx(path, CARD, WEIGHTS)


def expected_probability(body: bytes) -> float:
    x = preprocess(body, SIZE, CARD.mean, CARD.std).reshape(1, -1).astype(np.float64)
    logits = x @ WEIGHTS
    return float(1 / (1 + np.exp(-(logits[0, 1] - logits[0, 0]))))


def make_context(model_dir: Path, explainer: bool = True) -> Context:
    """What ts.model_loader does for a worker: the manifest, model-config.yaml and the metrics cache."""
    config = {"handler": {"backend": "onnxruntime", "threads": 1, "profile": True,
                          **({"explainer": C.EXPLAINER_NAME} if explainer else {})}}
    (model_dir / C.MODEL_CONFIG_NAME).write_text(yaml.safe_dump(config))
    manifest = {"model": {"modelName": C.MODEL_NAME, "serializedFile": "tiny.onnx", "handler": "xray_handler.py",
                          "modelVersion": "test-1", "configFile": C.MODEL_CONFIG_NAME}}
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    return Service(C.MODEL_NAME, str(model_dir), manifest, None, None, 8, metrics_cache=metrics).context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("model_dir")
    tiny_onnx(d / "tiny.onnx")
    torch.manual_seed(0)
    export_torchscript(build_model("xraynet", "ce", SIZE, ARCH_ARGS), CARD, d / C.EXPLAINER_NAME)
    return d


@pytest.fixture(scope="module")
def served(model_dir: Path) -> tuple[XrayHandler, Context]:
    context = make_context(model_dir)
    handler = XrayHandler()
    handler.initialize(context)
    # First calls pay one-off costs (PIL's decoder plugins, matplotlib for the overlay, TorchScript's
    # profiling runs), as a worker's first requests do; the cases below see the steady state.
    for _ in range(3):
        handle(handler, context, [request(image(0)), request(image(0, "JPEG"), explain=True), request(b"GIF89a")])
    return handler, context


def image(seed: int, fmt: str = "PNG", side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def request(value: object = None, content_type: str = "application/octet-stream", explain: bool = False,
            headers: dict[str, str] | None = None, fields: dict[str, object] | None = None) -> dict:
    """One request as TorchServe's frontend sends it to the worker (bytes on the wire)."""
    params = [{"name": "body", "contentType": content_type, "value": value}] if value is not None else []
    params += [{"name": k, "contentType": "text/plain", "value": v} for k, v in (fields or {}).items()]
    hdrs = {**(headers or {}), **({"explain": "True"} if explain else {})}
    return {"requestId": uuid.uuid4().hex.encode(), "parameters": params,
            "headers": [{"name": k.encode(), "value": v.encode()} for k, v in hdrs.items()]}


def handle(handler: XrayHandler, context: Context, batch: list[dict]) -> list[tuple[int, dict]]:
    """Service.predict without the socket: TorchServe's own unpacking, then BaseHandler.handle."""
    headers, data, ids = Service.retrieve_data_for_inference(batch)
    context.request_ids, context.request_processor = ids, headers
    context.metrics.request_ids = ids
    out = handler.handle(data, context)
    assert len(out) == len(batch)
    statuses = [context.get_response_status(i)[0] for i in range(len(batch))]
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(batch)))
    # Compact JSON bytes, sent as they are: TorchServe would pretty-print a dict (indent=2).
    assert all(isinstance(o, bytes) and b"\n" not in o and b'": ' not in o for o in out)
    return list(zip(statuses, [json.loads(o) for o in out], strict=True))


def test_mixed_good_and_bad_requests_are_answered_each_alone(served: tuple[XrayHandler, Context]) -> None:
    a, b = image(1), image(2, "JPEG")
    answers = handle(*served, [request(a), request(b""), request(b, "image/jpeg"), request("some text", "text/plain"),
                               request(a[: len(a) // 2]), request(image(3, side=8)), request(b"GIF89a" + b"\0" * 64)])
    assert [s for s, _ in answers] == [200, 400, 200, 415, 400, 400, 415]
    assert [ErrorBody.model_validate(body).type for s, body in answers if s != 200] == [
        "empty_body", "unsupported_media_type", "corrupt_image", "image_too_small", "unsupported_media_type"]
    for (_, body), sent in zip([answers[0], answers[2]], [a, b], strict=True):
        pred = Prediction.model_validate(body)
        assert pred.probability == pytest.approx(expected_probability(sent), abs=1e-5)
        assert pred.label == ("PNEUMONIA" if pred.probability >= CARD.threshold else "NORMAL")
        assert (pred.model, pred.version, pred.backend) == ("tiny", "test-1", "onnxruntime")
    assert answers[0][1] != answers[2][1], "two images, two answers: no shared result object"


@pytest.mark.parametrize("explain_first", [True, False], ids=["explain-first", "predict-first"])
def test_predict_and_explain_in_one_batch(served: tuple[XrayHandler, Context], explain_first: bool) -> None:
    imgs = [image(10 + i) for i in range(5)]
    batch = [request(imgs[1]),
             request(imgs[2], explain=True, headers={"X-Target-Class": "normal"}),
             request(imgs[3], explain=True, headers={"X-Target-Class": "CAT"}),
             request(imgs[4], explain=True, fields={"target": b"\xff\xfe"})]
    batch.insert(0 if explain_first else len(batch), request(imgs[0], explain=True))
    answers = handle(*served, batch)
    order = [0, 1, 2, 3, 4] if explain_first else [1, 2, 3, 4, 0]  # answers[k] is for imgs[order[k]]
    by_image = {order[k]: answers[k] for k in range(5)}
    assert {i: s for i, (s, _) in by_image.items()} == {0: 200, 1: 200, 2: 200, 3: 400, 4: 400}
    assert {ErrorBody.model_validate(by_image[i][1]).type for i in (3, 4)} == {"invalid_target"}
    plain = Prediction.model_validate(by_image[1][1])
    assert plain.probability == pytest.approx(expected_probability(imgs[1]), abs=1e-5)
    for i, target in ((0, None), (2, "NORMAL")):
        exp = Explanation.model_validate(by_image[i][1])
        assert exp.prediction.probability == pytest.approx(expected_probability(imgs[i]), abs=1e-5)
        assert exp.target == (target or exp.prediction.label)
        heat = np.asarray(exp.heatmap)
        assert heat.shape == (SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1


def test_metrics_and_torchserve_timing_are_emitted(served: tuple[XrayHandler, Context],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        handle(*served, [request(image(20)), request(b""), request(image(21), explain=True)])
    lines = [r.getMessage() for r in caplog.records]

    def metric(name: str, kind: str | None = None) -> float:
        found = [line for line in lines if line.removeprefix("[METRICS]").startswith(f"{name}.")]
        assert found, f"{name} not emitted; got {lines}"
        assert kind is None or f"|#type:{kind}|" in found[-1], found[-1]
        return float(found[-1].split(":", 1)[1].split("|", 1)[0])

    # Latencies and the batch size are histograms (the frontend keeps buckets, sum and count).
    assert metric("XrayBatchSize", "HISTOGRAM") == 3 and metric("XrayBadRequests", "COUNTER") == 1
    for name in ("XrayPreprocessSeconds", "XrayInferenceSeconds", "XrayExplainSeconds"):
        assert 0 <= metric(name, "HISTOGRAM") < 60
    for name in ("HandlerTime", "ts_handler_preprocess", "ts_handler_inference", "ts_handler_postprocess"):
        assert metric(name) >= 0


def test_without_an_explainer_only_explanations_are_refused(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tiny.onnx").write_bytes((model_dir / "tiny.onnx").read_bytes())
    context = make_context(bare, explainer=False)
    handler = XrayHandler()
    handler.initialize(context)
    answers = handle(handler, context, [request(image(30), explain=True), request(image(31))])
    assert [s for s, _ in answers] == [422, 200]
    assert ErrorBody.model_validate(answers[0][1]).type == "not_explainable"
