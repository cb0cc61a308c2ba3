"""Bad input against the live server: alone and inside a batch of good requests; nothing crashes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from handlers.constants import MODEL_NAME
from handlers.schemas import ErrorBody, Prediction
from serving.settings import ServeSettings
from tests.bad_inputs import Case, cases
from tests.helpers import keys, workers

pytestmark = [pytest.mark.server, pytest.mark.slow]


def post(settings: ServeSettings, body: bytes, content_type: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {keys(settings)['inference']}", "Content-Type": content_type}
    return httpx.post(f"{settings.inference_url}/predictions/{MODEL_NAME}", content=body, headers=headers, timeout=60)


def worker_pids(settings: ServeSettings) -> list[int]:
    return sorted(w["pid"] for w in workers(settings))


def check(case: Case, r: httpx.Response) -> None:
    assert r.status_code == case.status, f"{case.name}: {r.status_code} {r.text[:200]}"
    assert r.headers.get("content-type", "").startswith("application/json"), case.name
    if case.status == 200:
        Prediction.model_validate(r.json())
    else:
        err = ErrorBody.model_validate(r.json())
        assert (err.code, err.type) == (case.status, case.type) and err.message, case.name


@pytest.fixture(scope="module")
def catalogue(sample_jpeg: bytes) -> list[Case]:
    return cases(sample_jpeg)


def test_each_case_alone(server: ServeSettings, catalogue: list[Case]) -> None:
    pids = worker_pids(server)
    for case in catalogue:
        check(case, post(server, case.body, case.content_type))
    assert worker_pids(server) == pids, "a bad request restarted the worker"


def test_each_bad_case_inside_a_batch_of_good_ones(server: ServeSettings, catalogue: list[Case],
                                                    sample_jpeg: bytes) -> None:
    pids = worker_pids(server)
    reference = Prediction.model_validate(post(server, sample_jpeg, "image/jpeg").json())
    with ThreadPoolExecutor(8) as pool:
        for case in (c for c in catalogue if c.status != 200):
            good = [pool.submit(post, server, sample_jpeg, "image/jpeg") for _ in range(7)]
            bad = pool.submit(post, server, case.body, case.content_type)
            check(case, bad.result())
            for f in good:
                r = f.result()
                assert r.status_code == 200, f"{case.name} broke a batch-mate: {r.status_code} {r.text[:200]}"
                p = Prediction.model_validate(r.json())
                assert p.label == reference.label and abs(p.probability - reference.probability) < 1e-6
    assert worker_pids(server) == pids, "a bad request restarted the worker"


@pytest.mark.parametrize("content_type,body,status", [
    ("text/plain", b"just text", 415),
    ("application/json", b'{"image": "aGVsbG8="}', 415),
])
def test_text_and_json_bodies_are_refused(server: ServeSettings, content_type: str, body: bytes, status: int) -> None:
    r = post(server, body, content_type)
    assert r.status_code == status
    assert ErrorBody.model_validate(r.json()).type == "unsupported_media_type"


def test_a_body_over_max_request_size_gets_413(server: ServeSettings, sample_jpeg: bytes) -> None:
    body = b"\0" * (server.max_request_size + 1024)
    r = post(server, body, "application/octet-stream")
    assert r.status_code == 413  # refused by the gateway from the Content-Length, before any byte is read
    assert ErrorBody.model_validate(r.json()).type == "body_too_large"
    assert post(server, sample_jpeg, "image/jpeg").status_code == 200
