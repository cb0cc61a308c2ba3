"""Readiness: the model answers a real radiograph with a label. The one check for the launcher
(`make serve` returns once it holds) and the container's HEALTHCHECK (docker/healthcheck.py).

`/ping` says Healthy before the model is loaded and while its workers crash-loop, and a noise
image is (rightly) refused by a model that gates its input, so the probe is a real radiograph
packed into the .mar at archive time (handlers.constants.READINESS_PROBE_NAME).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx
from pydantic import ValidationError

from handlers.constants import MODEL_NAME
from handlers.constants import READINESS_PROBE_NAME as PROBE_NAME
from handlers.schemas import Prediction


class NotReady(RuntimeError):
    """The reason the server is not ready (yet)."""


def probe_from_mar(mar: Path) -> bytes:
    """The readiness radiograph packed into the archive."""
    try:
        with zipfile.ZipFile(mar) as z:
            return z.read(PROBE_NAME)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise NotReady(f"{mar} has no readiness probe ({exc}): rebuild it with `make archive`") from None


def check(inference_url: str, token: str | None, probe: bytes, timeout: float = 15) -> Prediction:
    """POST the probe; the server is ready when it answers 200 with a Prediction carrying a label."""
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        r = httpx.post(f"{inference_url.rstrip('/')}/predictions/{MODEL_NAME}", content=probe, headers=headers,
                       timeout=timeout)
    except httpx.HTTPError as exc:
        raise NotReady(f"no answer from {inference_url}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        raise NotReady(f"the probe radiograph got {r.status_code}: {r.text[:200]}")
    try:
        prediction = Prediction.model_validate(r.json())
    except (ValueError, ValidationError) as exc:
        raise NotReady(f"the probe's 200 is not a Prediction: {exc}") from None
    if not prediction.label:
        raise NotReady("the probe's answer carries no label")
    return prediction
