"""One request of a TorchServe batch, from its raw fields to its answer: one object per request.

TorchServe hands the handler a list of requests (a dict of fields each) and, beside it, each
request's headers in the context, both indexed by the request's position in the batch. An
XrayRequest keeps that position and everything that belongs to the request: the decoded model
input, whether an explanation was asked for and of which class, the operating point it chose,
its error, its probability, its OOD score and its heatmap. A bad field refuses that request only;
its batch-mates never see it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from handlers import multipart
from handlers.constants import CONTENT_TYPE_HEADER
from handlers.preprocess import PreprocessError, preprocess
from handlers.schemas import DEFAULT_POINT, ErrorBody, ModelCard
from handlers.trust import OPERATING_POINT_FIELD, OPERATING_POINT_HEADER, TrustError, resolve_point

log = logging.getLogger(__name__)

PAYLOAD_FIELDS = ("data", "file", "body")  # multipart field names, then a raw body
TARGET_FIELD = "target"  # multipart field; raw bodies use the header (TorchServe drops their query)
TARGET_HEADER = "x-target-class"
EXPLAIN_HEADER = "explain"  # TorchServe's frontend sets explain=True on /explanations/<model>


@dataclass
class XrayRequest:
    index: int  # the position in TorchServe's batch, for its data list and its context alike
    explain: bool = False
    target: int | None = None  # class index to explain; None until chosen (the predicted class)
    image: np.ndarray | None = None  # the model input [1, S, S]
    point: str = DEFAULT_POINT  # the operating point's name
    threshold: float = 0.5  # its threshold on the calibrated probability
    error: ErrorBody | None = None
    probability: float | None = None  # calibrated P(PNEUMONIA)
    ood_score: float | None = None
    heatmap: np.ndarray | None = None  # Grad-CAM [S, S] in [0, 1]

    @property
    def ok(self) -> bool:
        return self.error is None

    def refuse(self, code: int, type: str, message: str, **extra: float) -> None:
        self.error = ErrorBody(code=code, type=type, message=message, **extra)


def payload(request: dict) -> bytes:
    """The image bytes of one request: multipart field 'data' or 'file', else the raw body."""
    for key in PAYLOAD_FIELDS:
        value = request.get(key)
        if value is None:
            continue
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        # TorchServe turns text/* and application/json bodies into str/dict before we see them.
        raise PreprocessError(415, "unsupported_media_type", "send the image bytes (Content-Type image/png, "
                              "image/jpeg or application/octet-stream), not text or JSON")
    fields = sorted(str(k) for k in request)
    raise PreprocessError(400, "missing_field", "no image in the request: expected a multipart field 'data' or "
                          f"'file' or a raw body; got fields {fields}")


def request_fields(request: dict, content_type: Any) -> dict:
    """A multipart body (the gateway passes forms on as raw bytes, their Content-Type beside) parsed
    into its fields, or a PreprocessError; any other request as TorchServe gives it."""
    if isinstance(content_type, bytes | bytearray):
        content_type = bytes(content_type).decode("latin-1")
    body = request.get("body")
    if multipart.is_multipart(content_type) and isinstance(body, bytes | bytearray):
        return multipart.parse(bytes(body), content_type)
    return request


def header(headers: dict[str, Any], name: str) -> Any:
    """A request header by its lower-case NAME, from headers whose names read_request lowered (once a
    request), so whatever case the client wrote it in is found."""
    return headers.get(name)


def explain_target(request: dict, headers: dict[str, Any], class_names: tuple[str, ...]) -> int | None:
    """The class to explain, from the multipart field 'target' or the X-Target-Class header; None
    when neither is given (explain the predicted class)."""
    value = request.get(TARGET_FIELD)
    if value is None:
        value = header(headers, TARGET_HEADER)
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            value = repr(bytes(value)[:40])
    name = value.strip().upper() if isinstance(value, str) else None
    if name not in class_names:
        raise PreprocessError(400, "invalid_target", f"target {str(value)[:60]!r} is not one of {list(class_names)}")
    return class_names.index(name)


def operating_point(request: dict, headers: dict[str, Any], card: ModelCard) -> tuple[str, float]:
    """The point a request chose (multipart field 'operating_point' or header X-Operating-Point) and its
    threshold; the card's default when it chose none. A card without points has one: its threshold."""
    value = request.get(OPERATING_POINT_FIELD)
    if value is None:
        value = header(headers, OPERATING_POINT_HEADER)
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    if value is not None and not isinstance(value, str):
        value = str(value)
    points = card.operating_points
    if not points:  # a model from before calibration: only its own threshold
        if value is not None and value.strip() != card.default_point:
            raise PreprocessError(400, "unknown_operating_point", f"this model has no operating point {value[:60]!r}")
        return card.default_point, card.threshold
    try:
        name, point = resolve_point(points, value, card.default_point)
    except TrustError as err:
        raise PreprocessError(err.status, err.type, err.message[:200]) from None
    return name, point.threshold


def read_request(index: int, request: dict, headers: dict[str, Any], card: ModelCard) -> XrayRequest:
    """Decode one request on its own; whatever is wrong with it becomes its error, never the batch's."""
    headers = {str(k).lower(): v for k, v in headers.items()}  # once, not per header looked up
    r = XrayRequest(index, explain=str(header(headers, EXPLAIN_HEADER)) == "True")
    try:
        fields = request_fields(request, header(headers, CONTENT_TYPE_HEADER))
        r.point, r.threshold = operating_point(fields, headers, card)
        r.image = preprocess(payload(fields), card.input_size, card.mean, card.std)
        if r.explain:
            r.target = explain_target(fields, headers, card.class_names)
    except PreprocessError as err:
        r.refuse(err.status, err.type, err.message)
    except Exception as exc:
        log.exception("request %d: unexpected preprocessing failure", index)
        r.refuse(500, "internal_error", f"preprocessing failed: {exc}")
    return r
