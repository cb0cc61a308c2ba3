"""The TorchServe handler in this process, run the way a TorchServe worker runs it, with no server.

A worker (ts.model_loader, ts.service) unpacks the .mar, builds a ts.context.Context from its
manifest and model-config.yaml, calls XrayHandler.initialize, then for each batch turns the wire
requests into the handler's data list and per-request headers
(Service.retrieve_data_for_inference) and calls handle(). InProcessWorker takes the same steps
with the same classes; only the frontend and its socket are missing. An offline answer is
therefore the served answer: the same preprocessing, runner, threshold and error bodies.

    with InProcessWorker.open(Path("model_store/xray.mar")) as worker:
        answers = worker.predict_many([("a.jpeg", body_a), ("b.npy", body_b)])

The model may be a .mar (its model file and model-config.yaml, as served), an exported model
(.onnx or .torchscript.pt) or a training checkpoint (.pt), which is first exported to ONNX as
`make export` would write it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from handlers import constants as C
from handlers.preprocess import sniff
from handlers.schemas import ErrorBody, Prediction
from handlers.torchserve import read_manifest, read_model_config

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
EXPORTED_SUFFIXES = tuple(C.MODEL_SUFFIX.values())


class ModelSourceError(RuntimeError):
    """A model path that is missing or not one of the kinds above."""


class Refused(Exception):
    """The handler's 4xx/5xx answer, worded as the live client words an XrayHTTPError."""

    def __init__(self, status: int, error: ErrorBody) -> None:
        super().__init__(f"HTTP {status} {error.type}: {error.message}")
        self.status, self.error = status, error


@dataclass
class WorkerAnswer:
    """One request's answer: the status and JSON body the frontend would have sent back."""

    name: str
    status: int
    body: dict[str, Any]
    latency_s: float  # the handler's time for the batch the request was in
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def prediction(self) -> Prediction | None:
        return Prediction.model_validate(self.body) if self.ok else None

    @property
    def error(self) -> Refused | None:
        return None if self.ok else Refused(self.status, ErrorBody.model_validate(self.body))


def check_model(model: Path) -> Path:
    model = Path(model)
    if not model.is_file():
        raise ModelSourceError(f"no model file at {model}: run `make train export` (or `make archive`), "
                               "or pass a .mar, .onnx, .torchscript.pt or checkpoint")
    return model


def content_type_for(body: bytes) -> str:
    return CONTENT_TYPES.get(sniff(body), "application/octet-stream")


def wire_request(body: bytes, content_type: str | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One request as the gateway and TorchServe's frontend hand it to a worker: the body as raw
    bytes (parameter 'body'), the client's Content-Type in C.CONTENT_TYPE_HEADER beside it."""
    sent = {"Content-Type": "application/octet-stream",
            C.CONTENT_TYPE_HEADER: content_type or content_type_for(body), **(headers or {})}
    return {"requestId": uuid.uuid4().hex.encode(),
            "parameters": [{"name": "body", "contentType": "application/octet-stream", "value": body}],
            "headers": [{"name": k.encode(), "value": v.encode()} for k, v in sent.items()]}


def _metrics_cache() -> Any:
    import ts
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    cache.initialize_cache()
    return cache


class InProcessWorker:
    """XrayHandler behind a real ts.service.Service, fed batches of request bodies."""

    def __init__(self, model_dir: Path, manifest: dict[str, Any], batch_size: int, gpu: int | None = None,
                 source: Path | None = None) -> None:
        from ts.service import Service

        from handlers.xray_handler import XrayHandler

        self.model_dir, self.manifest, self.batch_size = model_dir, manifest, batch_size
        self.source = source or model_dir
        self.service = Service(C.MODEL_NAME, str(model_dir), manifest, None, gpu, batch_size,
                               metrics_cache=_metrics_cache())
        self.handler = XrayHandler()
        self.handler.initialize(self.service.context)
        self.card = self.handler.card

    @classmethod
    @contextmanager
    def open(cls, model: Path, batch_size: int | None = None, threads: int = 0,
             gpu: int | None = None) -> Iterator[InProcessWorker]:
        """A worker for a .mar, an exported model or a checkpoint; its files live while the block runs."""
        model = check_model(model)
        tmp = Path(tempfile.mkdtemp(prefix="xray-offline-"))
        try:
            manifest, config = _stage(model, tmp, threads)
            size = batch_size or int(config.get("batchSize", C.BATCH_SIZE))
            yield cls(tmp, manifest, size, gpu, source=model)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def handle(self, requests: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
        """One batch of wire requests -> (status, JSON body) each: Service.predict without the socket."""
        from ts.service import Service

        headers, data, ids = Service.retrieve_data_for_inference(requests)
        context = self.service.context
        context.request_ids, context.request_processor = ids, headers
        context.metrics.request_ids = ids
        out = self.handler.handle(data, context)
        # The frontend sends bytes as they are and JSON-encodes anything else, with the status it set.
        return [(headers[i].get_response_status_code(),
                 json.loads(body if isinstance(body, bytes | str) else json.dumps(body)))
                for i, body in enumerate(out)]

    def predict_many(self, items: Iterable[tuple[str, bytes | Path] | tuple[str, bytes | Path, str]],
                     headers: dict[str, str] | None = None) -> list[WorkerAnswer]:
        """Every (name, bytes or path[, content type]) item, in batches of batch_size; answers in
        input order. Without a content type, the one the body's signature names."""
        items = list(items)
        answers: list[WorkerAnswer] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            requests = []
            for item in chunk:
                body = item[1].read_bytes() if isinstance(item[1], Path) else item[1]
                requests.append(wire_request(body, item[2] if len(item) > 2 else None, headers))
            t0 = time.perf_counter()
            results = self.handle(requests)
            elapsed = time.perf_counter() - t0
            answers += [WorkerAnswer(item[0], status, body, elapsed)
                        for item, (status, body) in zip(chunk, results, strict=True)]
        return answers

    def predict(self, body: bytes, headers: dict[str, str] | None = None) -> WorkerAnswer:
        return self.predict_many([("body", body)], headers)[0]


def _stage(model: Path, into: Path, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lay the model out as TorchServe would unpack it into a worker's model_dir: the manifest and
    model-config.yaml of the archive, or ones written for a bare model file."""
    if zipfile.is_zipfile(model) and model.suffix == ".mar":
        with zipfile.ZipFile(model) as z:
            z.extractall(into)  # what TorchServe does with the .mar in its model store
        return read_manifest(model), read_model_config(model)
    if model.name.endswith(EXPORTED_SUFFIXES):
        target = into / model.name
        shutil.copy2(model, target)
        backend = next(b for b, suffix in C.MODEL_SUFFIX.items() if model.name.endswith(suffix))
    elif model.suffix in (".pt", ".pth"):
        target = _export_checkpoint(model, into)
        backend = "onnxruntime"
    else:
        raise ModelSourceError(f"{model}: expected a .mar, .onnx, .torchscript.pt or a training checkpoint (.pt)")
    config = {"handler": {"backend": backend, "threads": threads}}
    (into / C.MODEL_CONFIG_NAME).write_text(yaml.safe_dump(config))
    manifest = {"model": {"modelName": C.MODEL_NAME, "serializedFile": target.name, "handler": "xray_handler.py",
                          "configFile": C.MODEL_CONFIG_NAME}}
    return manifest, config


def _export_checkpoint(checkpoint: Path, into: Path) -> Path:
    """A training checkpoint, exported to the ONNX model `make export` writes (the model the server
    runs). Imported here only: serving stays torch-free unless a checkpoint is given."""
    from export.cards import export_card
    from export.onnx_export import export_onnx
    from training.checkpoint import load_checkpoint
    from training.trust import guarded

    try:
        card, model, ckpt = load_checkpoint(checkpoint)
    except Exception as exc:
        raise ModelSourceError(f"{checkpoint}: not a training checkpoint nor an exported model: {exc}") from exc
    card = export_card(card, checkpoint)
    # The served graph: logits and, with the checkpoint's OOD detector inside, ood_score.
    return export_onnx(guarded(model, ckpt), card, into / f"{card.name}.onnx")
