"""serving.client and serving.evaluate against a real TorchServe (the session `server` fixture)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from handlers.schemas import Prediction
from serving.client import XrayClient, XrayHTTPError, XrayInvalidResponse, XrayUnavailable, predict_sync
from serving.settings import ServeSettings
from tests.helpers import REPO, free_ports
from training.metrics import binary_metrics

pytestmark = [pytest.mark.server, pytest.mark.slow]

EVAL_LIMIT = 120


def client(server: ServeSettings, **kw: object) -> XrayClient:
    return XrayClient(server.inference_url, key_file=server.key_file, **kw)  # type: ignore[arg-type]


def evaluate_cli(*args: str, key_file: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XRAY_KEY_FILE": str(key_file)} if key_file else dict(os.environ)
    env.pop("XRAY_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "serving.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_predict_validates_the_answer(server: ServeSettings, sample_jpeg: bytes) -> None:
    async def run() -> tuple[Prediction, int]:
        async with client(server) as c:
            return await c.predict_counted(sample_jpeg)

    prediction, attempts = asyncio.run(run())
    assert isinstance(prediction, Prediction) and attempts == 1
    assert prediction.label == ("PNEUMONIA" if prediction.probability >= prediction.threshold else "NORMAL")
    # the blocking wrapper gives the same answer
    again = predict_sync(sample_jpeg, server.inference_url, key_file=server.key_file)
    assert again.probability == pytest.approx(prediction.probability, abs=1e-9)


def test_4xx_raises_the_error_body_and_is_not_retried(server: ServeSettings) -> None:
    async def run(c: XrayClient) -> XrayHTTPError:
        async with c:
            with pytest.raises(XrayHTTPError) as info:
                await c.predict(b"this is not an image")
            return info.value

    c = client(server, retries=5, backoff=0.01)
    err = asyncio.run(run(c))
    assert err.status == 415 and err.error.code == 415 and err.error.type == "unsupported_media_type"
    assert err.attempts == 1 and c.requests_sent == 1


def test_a_wrong_token_that_the_key_file_cannot_fix_is_a_clear_error(server: ServeSettings, sample_jpeg: bytes,
                                                                    tmp_path: Path) -> None:
    stale = tmp_path / "key_file.json"
    stale.write_text(json.dumps({"inference": {"key": "wrong"}, "management": {"key": "x"}, "API": {"key": "y"}}))
    c = XrayClient(server.inference_url, key_file=stale, retries=3, backoff=0.01)

    async def run() -> XrayHTTPError:
        async with c:
            with pytest.raises(XrayHTTPError) as info:
                await c.predict(sample_jpeg)
            return info.value

    err = asyncio.run(run())
    assert err.token_refused and err.status == 401
    assert err.attempts == 2  # the first try and one after re-reading the key file, no more


def test_connection_refused_is_retried_with_backoff_then_fails_clearly(sample_jpeg: bytes) -> None:
    (port,) = free_ports(1)  # nothing listens there
    c = XrayClient(f"http://127.0.0.1:{port}", token="t", retries=3, backoff=0.1)

    async def run() -> XrayUnavailable:
        async with c:
            with pytest.raises(XrayUnavailable) as info:
                await c.predict(sample_jpeg)
            return info.value

    t0 = time.perf_counter()
    err = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert err.attempts == 4 and c.requests_sent == 4
    assert "after 4 attempt(s)" in str(err) and "ConnectError" in str(err)
    assert elapsed >= 0.1 + 0.2 + 0.4  # exponential back-off between the attempts


def test_503_is_retried_and_a_bad_200_is_refused(sample_jpeg: bytes) -> None:
    answers = [503, 503, 200]
    good = {"label": "NORMAL", "probability": 0.1, "probabilities": {"NORMAL": 0.9, "PNEUMONIA": 0.1},
            "threshold": 0.5, "model": "m", "version": "1", "backend": "onnxruntime", "device": "cpu"}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "image/jpeg"
        assert request.headers["authorization"] == "Bearer t"
        status = answers.pop(0) if answers else 200
        return httpx.Response(status, json=good if status == 200 else {"code": 503, "type": "ServiceUnavailable",
                                                                         "message": "queue full"})

    async def run(transport: httpx.MockTransport) -> tuple[Prediction, int]:
        async with XrayClient("http://127.0.0.1:1", token="t", backoff=0.01, transport=transport) as c:
            return await c.predict_counted(sample_jpeg)

    prediction, attempts = asyncio.run(run(httpx.MockTransport(handler)))
    assert attempts == 3 and prediction.probability == 0.1
    bad = httpx.MockTransport(lambda request: httpx.Response(200, json={"label": "maybe"}))
    with pytest.raises(XrayInvalidResponse):
        asyncio.run(run(bad))


def test_predict_many_bounds_concurrency_and_keeps_order(server: ServeSettings, data_dir: Path) -> None:
    paths = sorted((data_dir / "test" / "NORMAL").glob("*.jp*g"))[:6]
    items = [(p.name, p) for p in paths] + [("junk", b"junk")]

    async def run() -> list:
        async with client(server, concurrency=3) as c:
            return await c.predict_many(items, progress=False)

    results = asyncio.run(run())
    assert [r.name for r in results] == [name for name, _ in items]
    assert all(r.ok and r.attempts == 1 and r.latency_s > 0 for r in results[:-1])
    assert not results[-1].ok and isinstance(results[-1].error, XrayHTTPError)


def test_evaluate_cli_on_the_live_endpoint(server: ServeSettings, data_dir: Path, export_dir: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = evaluate_cli("--url", server.inference_url, "--data-dir", str(data_dir), "--split", "test",
                        "--limit", str(EVAL_LIMIT), "--expect", str(export_dir / "predictions_xraynet.json"),
                        "--out-dir", str(out), key_file=server.key_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "roc auc" in proc.stdout and "served vs offline" in proc.stdout
    for name in ("evaluate.json", "evaluate.md", "roc.png", "confusion.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "evaluate.json").read_text())
    files = [p["file"] for p in report["predictions"]]
    assert len(files) == len(set(files)) == report["images"] == report["answered"]
    assert abs(report["images"] - EVAL_LIMIT) <= 2 and not report["unanswered"]
    labels = {p["label"] for p in report["predictions"]}
    assert labels == {0, 1}  # stratified: both classes
    assert all((data_dir / f).is_file() for f in files)
    y = np.array([p["label"] for p in report["predictions"]])
    prob = np.array([p["probability"] for p in report["predictions"]])
    expected = binary_metrics(y, prob, report["threshold"])
    for key, value in expected.items():
        assert report["metrics"][key] == pytest.approx(value, nan_ok=True), key
    assert report["expect"]["compared"] > 0 and not report["expect"]["mismatches"]
    assert report["expect"]["max_abs_diff"] <= 1e-5
    assert set(report["latency_ms"]) >= {"p50", "p95", "p99"} and report["throughput_rps"] > 0

    proc = evaluate_cli("--url", server.inference_url, "--data-dir", str(data_dir), "--limit", "10",
                        "--min-accuracy", "1.01", "--out-dir", str(tmp_path / "strict"), key_file=server.key_file)
    assert proc.returncode == 1
    assert "error: accuracy" in proc.stderr and "< --min-accuracy 1.01" in proc.stderr


def test_evaluate_fails_fast_when_the_server_is_unreachable(data_dir: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    t0 = time.perf_counter()
    proc = evaluate_cli("--url", f"http://127.0.0.1:{port}", "--data-dir", str(data_dir), "--retries", "1",
                        "--out-dir", str(tmp_path / "eval"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: server unreachable:")
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "eval" / "evaluate.json").exists()


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L").resize((128, 128)))


def test_evaluate_reads_the_course_npy_files(server: ServeSettings, data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "npy"
    folder.mkdir()
    for name in ("NORMAL", "PNEUMONIA"):
        paths = sorted((data_dir / "test" / name).glob("*.jp*g"))[:4]
        np.save(folder / f"x_test_{name.lower()}.npy", np.stack([_gray(p) for p in paths]))
    out = tmp_path / "eval"
    proc = evaluate_cli("--url", server.inference_url, "--data-dir", str(folder), "--out-dir", str(out),
                        key_file=server.key_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "evaluate.json").read_text())
    assert report["answered"] == 8
    assert [p["file"] for p in report["predictions"]][:2] == ["test/NORMAL/00000", "test/NORMAL/00001"]
    assert sorted(p["label"] for p in report["predictions"]) == [0] * 4 + [1] * 4
