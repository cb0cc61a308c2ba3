"""One TorchServe batch, split into the valid model inputs and a 4xx error per bad request."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from handlers import multipart
from handlers.preprocess import PreprocessError, preprocess
from handlers.schemas import ErrorBody, ModelCard

log = logging.getLogger(__name__)

PAYLOAD_FIELDS = ("data", "file", "body")  # multipart field names, then a raw body


@dataclass
class Batch:
    size: int
    inputs: list[np.ndarray] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # the request index of each input
    errors: dict[int, ErrorBody] = field(default_factory=dict)
    probability: np.ndarray | None = None  # P(PNEUMONIA) of each input, after inference
    fields: list[dict] = field(default_factory=list)  # each request's fields (a parsed form's, else TorchServe's)


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


def request_fields(request: dict, content_type: str | None) -> dict:
    """A multipart body (the gateway passes forms on as raw bytes, their Content-Type beside) parsed
    into its fields; any other request as TorchServe gives it."""
    body = request.get("body")
    if multipart.is_multipart(content_type) and isinstance(body, bytes | bytearray):
        return multipart.parse(bytes(body), content_type or "")
    return request


def split_requests(requests: list[dict], card: ModelCard, content_types: list[str | None] | None = None) -> Batch:
    """Decode every request on its own; a failure becomes that request's error, never the batch's."""
    batch = Batch(size=len(requests))
    content_types = content_types or [None] * len(requests)
    for i, request in enumerate(requests):
        batch.fields.append({})
        try:
            batch.fields[i] = request_fields(request, content_types[i])
            x = preprocess(payload(batch.fields[i]), card.input_size, card.mean, card.std)
        except PreprocessError as err:
            batch.errors[i] = ErrorBody(code=err.status, type=err.type, message=err.message)
            continue
        except Exception as exc:
            log.exception("request %d: unexpected preprocessing failure", i)
            batch.errors[i] = ErrorBody(code=500, type="internal_error", message=f"preprocessing failed: {exc}")
            continue
        batch.inputs.append(x)
        batch.index.append(i)
    return batch
