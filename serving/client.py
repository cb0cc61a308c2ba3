"""Async httpx client for POST /predictions/xray: retries, token refresh, bounded concurrency.

    python -m serving.client predict IMAGE [IMAGE...] [--url INFERENCE_URL] [--json]
    python -m serving.client explain IMAGE -o overlay.png [--target NORMAL|PNEUMONIA]

    async with XrayClient(INFERENCE_URL) as client:
        prediction = await client.predict(jpeg_bytes)
        results = await client.predict_many([("a.jpeg", path_a), ("b.npy", npy_bytes)])

    predict_sync(jpeg_bytes, url=INFERENCE_URL)  # one-off, blocking

Every 200 answer is validated as a Prediction. A 4xx raises XrayHTTPError carrying the server's
ErrorBody and is never retried, except a refused token (the gateway's 401 after a rotation):
the key file is read again and the request sent once more. 502/503/504/507 (the gateway's 503
for a died worker, a restarting server or overload), connection errors and timeouts are retried
with exponential back-off, never sooner than the server's Retry-After; when the attempts run
out, XrayUnavailable says how many were made and why.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import ValidationError
from tqdm import tqdm

from handlers.constants import INFERENCE_URL, MODEL_NAME
from handlers.preprocess import sniff
from handlers.schemas import ErrorBody, Explanation, Prediction
from serving import settings

DEFAULT_URL = INFERENCE_URL
RETRY_STATUSES = frozenset({502, 503, 504, 507})
MAX_BACKOFF_S = 8.0
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
Body = bytes | Path
M = TypeVar("M", Prediction, Explanation)


class XrayError(Exception):
    """Base class: every failure of a prediction request; `attempts` = HTTP requests made."""

    attempts: int = 0


class XrayHTTPError(XrayError):
    """A 4xx (or non-retryable 5xx) answer; `error` is the server's ErrorBody."""

    def __init__(self, status: int, error: ErrorBody, attempts: int) -> None:
        super().__init__(f"HTTP {status} {error.type}: {error.message}")
        self.status, self.error, self.attempts = status, error, attempts

    @property
    def token_refused(self) -> bool:
        # 401 from the gateway; TorchServe itself answered 400 InvalidKeyException.
        return self.status == 401 or self.error.type == "InvalidKeyException"


class XrayUnavailable(XrayError):
    """No usable answer after every retry: connection errors, timeouts, 503 and friends."""

    def __init__(self, url: str, attempts: int, cause: str) -> None:
        super().__init__(f"no answer from {url} after {attempts} attempt(s): {cause}")
        self.url, self.attempts, self.cause = url, attempts, cause


class XrayInvalidResponse(XrayError):
    """A 200 whose body is not a Prediction: client and server disagree on the schema."""

    def __init__(self, detail: str, attempts: int) -> None:
        super().__init__(f"the server's 200 answer is not a valid Prediction: {detail}")
        self.attempts = attempts


@dataclass
class Result:
    """One item of predict_many: the prediction or the error, latency (incl. retries) and attempts."""

    name: str
    prediction: Prediction | None
    error: XrayError | None
    latency_s: float
    attempts: int

    @property
    def ok(self) -> bool:
        return self.prediction is not None


def content_type_for(body: bytes) -> str:
    return CONTENT_TYPES.get(sniff(body), "application/octet-stream")


def endpoint(url: str, model: str = MODEL_NAME) -> str:
    url = url.rstrip("/")
    return url if "/predictions/" in url else f"{url}/predictions/{model}"


def _error_body(response: httpx.Response) -> ErrorBody:
    try:
        return ErrorBody.model_validate(response.json())
    except (ValueError, ValidationError):
        text = response.text.strip()[:300] or response.reason_phrase or "no body"
        return ErrorBody(code=response.status_code, type=f"http_{response.status_code}", message=text)


def _retry_after(response: httpx.Response) -> float:
    """The server's Retry-After in seconds (0 when absent or not a number), capped at MAX_BACKOFF_S."""
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(response.headers.get("retry-after", 0))))
    except ValueError:
        return 0.0


class XrayClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, key_file: Path | str | None = None,
                 concurrency: int = 16, timeout: float = 60, retries: int = 5, backoff: float = 0.25,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = endpoint(url)
        self.key_file = Path(key_file) if key_file else None
        self.token = token or settings.token("inference", self.key_file)
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.requests_sent = 0  # every HTTP request, retries included
        self._transport = transport
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> XrayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._http = httpx.AsyncClient(timeout=self.timeout, limits=limits, transport=self._transport)
        return self._http

    def reload_token(self) -> str | None:
        """Read the key file again (after expiry or rotation); XRAY_TOKEN still wins if set."""
        self.token = settings.token("inference", self.key_file) or self.token
        return self.token

    def _delay(self, attempt: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff * 2 ** (attempt - 1))

    async def predict(self, body: bytes, content_type: str | None = None) -> Prediction:
        prediction, _ = await self.predict_counted(body, content_type)
        return prediction

    async def predict_counted(self, body: bytes, content_type: str | None = None) -> tuple[Prediction, int]:
        """The prediction and the number of HTTP requests it took; raises an XrayError."""
        return await self._post(self.url, body, {"Content-Type": content_type or content_type_for(body)}, Prediction)

    async def explain(self, body: bytes, target: str | None = None) -> Explanation:
        """Prediction + Grad-CAM heatmap (POST /explanations/xray) for the predicted or the `target` class."""
        headers = {"Content-Type": content_type_for(body)} | ({"X-Target-Class": target} if target else {})
        explanation, _ = await self._post(self.url.replace("/predictions/", "/explanations/"), body, headers,
                                          Explanation)
        return explanation

    async def _post(self, url: str, body: bytes, headers: dict[str, str], schema: type[M]) -> tuple[M, int]:
        attempts, refreshed, cause, retry_after = 0, False, "", 0.0
        max_attempts = self.retries + 1
        while attempts < max_attempts:
            if attempts and cause:  # back off only after a retryable failure, not after a token refresh
                await asyncio.sleep(max(self._delay(attempts), retry_after))
            attempts += 1
            self.requests_sent += 1
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            try:
                response = await self._client().post(url, content=body, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timeouts
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            if response.status_code == 200:
                try:
                    return schema.model_validate(response.json()), attempts
                except (ValueError, ValidationError) as exc:
                    raise XrayInvalidResponse(str(exc)[:500], attempts) from None
            if response.status_code in RETRY_STATUSES:
                cause = f"HTTP {response.status_code} {_error_body(response).message[:200]}"
                retry_after = _retry_after(response)
                continue
            error = XrayHTTPError(response.status_code, _error_body(response), attempts)
            if error.token_refused and not refreshed:
                refreshed, cause = True, ""
                max_attempts += 1  # the token refresh does not use up a retry
                self.reload_token()
                continue
            raise error
        raise XrayUnavailable(url, attempts, cause)

    async def predict_many(self, items: Iterable[tuple[str, Body]], progress: bool = True,
                           desc: str = "predict") -> list[Result]:
        """Every (name, bytes or path) item, `concurrency` at a time; results in input order."""
        items = list(items)
        semaphore = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(items), desc=desc, unit="img", disable=None if progress else True)

        async def one(name: str, body: Body) -> Result:
            async with semaphore:
                data = body.read_bytes() if isinstance(body, Path) else body
                t0 = time.perf_counter()
                try:
                    prediction, attempts = await self.predict_counted(data)
                    result = Result(name, prediction, None, time.perf_counter() - t0, attempts)
                except XrayError as exc:
                    result = Result(name, None, exc, time.perf_counter() - t0, exc.attempts)
                bar.update(1)
                return result

        try:
            return list(await asyncio.gather(*(one(name, body) for name, body in items)))
        finally:
            bar.close()


def predict_sync(body: bytes, url: str = DEFAULT_URL, **client_args: object) -> Prediction:
    """One blocking prediction (scripts, notebooks); raises an XrayError."""

    async def run() -> Prediction:
        async with XrayClient(url, **client_args) as client:  # type: ignore[arg-type]
            return await client.predict(body)

    return asyncio.run(run())


def _print_results(results: list[Result], as_json: bool) -> None:
    if as_json:
        rows = [{"file": r.name, **(r.prediction.model_dump() if r.prediction else {"error": str(r.error)}),
                 "latency_ms": round(r.latency_s * 1000, 2), "attempts": r.attempts} for r in results]
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for r in results:
        if r.prediction:
            p = r.prediction
            print(f"{r.name}: {p.label} P(PNEUMONIA)={p.probability:.4f} (threshold {p.threshold:.4f}; "
                  f"{p.model} {p.version}, {p.backend} on {p.device}; {r.latency_s * 1000:.0f} ms)")
        else:
            print(f"{r.name}: error: {r.error}")


def explain_main(ns: argparse.Namespace) -> int:
    if not ns.image.is_file():
        print(f"error: no such file: {ns.image}", file=sys.stderr)
        return 2

    async def run() -> Explanation:
        async with XrayClient(ns.url, ns.token, ns.key_file) as client:
            return await client.explain(ns.image.read_bytes(), ns.target)

    try:
        exp = asyncio.run(run())
    except XrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ns.output.write_bytes(base64.b64decode(exp.overlay_png))
    p = exp.prediction
    print(f"{ns.image}: {p.label} P(PNEUMONIA)={p.probability:.4f}; Grad-CAM for {exp.target} -> {ns.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="predict one or more PNG/JPEG/.npy files")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--url", default=DEFAULT_URL)
    pr.add_argument("--token", help="inference key (default: XRAY_TOKEN, XRAY_KEY_FILE or .serve's key file)")
    pr.add_argument("--key-file", type=Path)
    pr.add_argument("--concurrency", type=int, default=16)
    pr.add_argument("--json", action="store_true", help="print the full predictions as JSON")
    ex = sub.add_parser("explain", help="Grad-CAM heatmap of one image, saved as a PNG overlay")
    ex.add_argument("image", type=Path)
    ex.add_argument("-o", "--output", type=Path, default=Path("overlay.png"))
    ex.add_argument("--target", choices=["NORMAL", "PNEUMONIA"], help="default: the predicted class")
    ex.add_argument("--url", default=DEFAULT_URL)
    ex.add_argument("--token")
    ex.add_argument("--key-file", type=Path)
    ns = p.parse_args(argv)
    if ns.command == "explain":
        return explain_main(ns)
    missing = [str(path) for path in ns.images if not path.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2

    async def run() -> list[Result]:
        async with XrayClient(ns.url, ns.token, ns.key_file, concurrency=ns.concurrency) as client:
            return await client.predict_many([(str(path), path) for path in ns.images],
                                             progress=len(ns.images) > 1)

    results = asyncio.run(run())
    _print_results(results, ns.json)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
