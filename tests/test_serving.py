"""A real TorchServe, started by serving.launcher on free loopback ports, over real HTTP."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from handlers import torchserve
from handlers.constants import MODEL_NAME, REPO_ROOT
from handlers.schemas import ErrorBody, Prediction
from serving import launcher
from serving.load import batch_counts, metric_sum
from serving.settings import ServeSettings, extract_netty_native, read_keys
from tests.helpers import free_ports, keys, serve_settings, workers

pytestmark = [pytest.mark.server, pytest.mark.slow]


def predict(settings: ServeSettings, body: bytes, token: str | None = "auto", **kw: object) -> httpx.Response:
    headers = dict(kw.pop("headers", {}))  # type: ignore[arg-type]
    if token == "auto":
        token = keys(settings)["inference"]
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{settings.inference_url}/predictions/{MODEL_NAME}",
                      content=body if not kw.get("files") else None, headers=headers, timeout=60, **kw)


def test_png_and_jpeg_answer_with_the_schema(server: ServeSettings, sample_jpeg: bytes) -> None:
    gray = np.asarray(Image.open(io.BytesIO(sample_jpeg)))
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    answers = []
    for body in (sample_jpeg, buf.getvalue()):
        r = predict(server, body)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        answers.append(Prediction.model_validate(r.json()))
    jpeg, png = answers
    assert jpeg.backend == "onnxruntime" and jpeg.device == "cpu" and jpeg.model
    assert abs(sum(jpeg.probabilities.values()) - 1) < 1e-6
    assert jpeg.label == ("PNEUMONIA" if jpeg.probability >= jpeg.threshold else "NORMAL")
    # A PNG of the decoded JPEG pixels is the same image: the same answer.
    assert png.probability == pytest.approx(jpeg.probability, abs=1e-6)


def test_multipart_fields_data_and_file(server: ServeSettings, sample_jpeg: bytes) -> None:
    raw = Prediction.model_validate(predict(server, sample_jpeg).json())
    for field in ("data", "file"):
        r = predict(server, b"", files={field: ("x.jpeg", sample_jpeg, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert Prediction.model_validate(r.json()).probability == pytest.approx(raw.probability, abs=1e-9)
    r = predict(server, b"", files={"image": ("x.jpeg", sample_jpeg, "image/jpeg")})
    assert r.status_code == 400
    assert ErrorBody.model_validate(r.json()).type == "missing_field"


def test_concurrent_requests_are_batched_and_bad_ones_answered_alone(server: ServeSettings, sample_jpeg: bytes) -> None:
    batches0, requests0 = batch_counts(server.metrics_url)
    bodies = [sample_jpeg] * 7 + [b"this is not an image"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: predict(server, b), bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 7 + [415], [r.text for r in responses]
    probs = {Prediction.model_validate(r.json()).probability for r in responses[:7]}
    assert max(probs) - min(probs) < 1e-6  # the same image gets the same answer inside a batch
    err = ErrorBody.model_validate(responses[-1].json())
    assert err.code == 415 and err.type == "unsupported_media_type" and err.message
    batches1, requests1 = batch_counts(server.metrics_url)
    batches, requests = batches1 - batches0, requests1 - requests0
    assert requests == len(bodies)
    assert batches < requests, f"{requests} concurrent requests ran in {batches} batches: no batching"
    # The handler's latencies are histograms (buckets, sum, count), not gauges that keep one value.
    text = httpx.get(f"{server.metrics_url}/metrics", timeout=10).text
    for name in ("XrayPreprocessSeconds", "XrayInferenceSeconds", "XrayBatchSize"):
        assert f"# TYPE {name} histogram" in text, name
        assert re.search(rf'^{name}_bucket{{.*le="\+Inf".*}} [1-9]', text, re.M), name
    assert metric_sum(server.metrics_url, "XrayBadRequests") >= 1


def test_token_is_required(server: ServeSettings, sample_jpeg: bytes) -> None:
    ts_keys = read_keys(server.ts_key_file)  # TorchServe's own keys are no client token either
    for token in (None, "wrong-token", ts_keys["inference"], ts_keys["management"]):
        r = predict(server, sample_jpeg, token=token)
        assert r.status_code == 401, r.text
        assert ErrorBody.model_validate(r.json()).type == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{server.inference_url}/ping", timeout=10)  # liveness needs no token
    assert r.status_code == 200 and r.json()["status"] == "Healthy"
    assert httpx.get(f"{server.metrics_url}/metrics", timeout=10).status_code == 200


def test_management_api_is_unreachable_from_any_port(server: ServeSettings) -> None:
    """Issue 12.3: PUT /models/xray?min_worker=0 with the management token stopped inference. No TCP
    port serves the management API now: the gateway answers 404, TorchServe listens on TCP only for
    gRPC (guarded by its own keys, which no client gets), and its sockets lie in a private dir."""
    token = keys(server)["inference"]
    for url in (server.inference_url, server.metrics_url):
        r = httpx.put(f"{url}/models/xray", params={"min_worker": 0}, timeout=10,
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404, r.text
    java = [p for p in psutil.process_iter(["cmdline"]) if str(server.state_dir) in " ".join(p.info["cmdline"] or [])
            and "org.pytorch.serve.ModelServer" in " ".join(p.info["cmdline"] or [])]
    assert len(java) == 1
    tcp = {c.laddr.port for c in java[0].net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert tcp == {server.grpc_inference_port, server.grpc_management_port}
    assert stat.S_IMODE(server.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.state_dir.stat().st_mode) == 0o700
    assert len(workers(server)) == 2  # the launcher reaches it, through the socket, with TorchServe's key
    mtoken = launcher.management_token(server)
    status, _ = torchserve.management_request(server.socket("management"), mtoken, "POST", "/models?url=xray.mar")
    assert status == 405  # and the model API stays off even there
    status, body = torchserve.management_request(server.socket("management"), mtoken, "GET", f"/models/{MODEL_NAME}")
    assert status == 200 and json.loads(body)[0]["batchSize"] == 8


def test_every_address_is_loopback_or_a_private_socket(server: ServeSettings) -> None:
    props = dict(line.split("=", 1) for line in (server.run_dir / "config.properties").read_text().splitlines())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith(f"unix:{server.run_dir}/")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false" and props["disable_token_authorization"] == "false"
    conf = (server.run_dir / "nginx.conf").read_text()
    assert f"listen 127.0.0.1:{server.inference_port} " in conf and f"listen 127.0.0.1:{server.metrics_port};" in conf


def test_committed_config_is_the_rendered_default() -> None:
    assert (REPO_ROOT / "serving" / "config.properties").read_text() == ServeSettings().properties()


def test_served_probabilities_equal_offline_onnx(server: ServeSettings, export_dir: Path, data_dir: Path) -> None:
    offline = json.loads((export_dir / "predictions_xraynet.json").read_text())["predictions"]
    assert len(offline) >= 100

    def served(item: dict) -> tuple[dict, httpx.Response]:
        return item, predict(server, (data_dir / item["file"]).read_bytes())

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(served, offline))
    # The OOD gate refuses (422 not_chest_xray) exactly the radiographs the offline model refuses.
    refused = {item["file"] for item, r in results if r.status_code == 422 and r.json()["type"] == "not_chest_xray"}
    assert refused == {item["file"] for item in offline if item.get("refused")}
    bad = [(item["file"], r.status_code) for item, r in results if r.status_code != 200 and item["file"] not in refused]
    assert not bad, bad[:5]
    results = [(item, r) for item, r in results if item["file"] not in refused]
    diffs = [abs(Prediction.model_validate(r.json()).probability - item["probability"]) for item, r in results]
    assert max(diffs) <= 1e-5, f"max |served - offline| = {max(diffs)}"
    labels = [(Prediction.model_validate(r.json()).label, item["predicted"]) for item, r in results]
    assert all(a == b for a, b in labels)


def test_a_second_instance_starts_beside_and_stops_cleanly(tmp_path: Path, model_store: Path,
                                                          server: ServeSettings, sample_jpeg: bytes) -> None:
    other = serve_settings(tmp_path, model_store).resolved()
    launcher.start(other, timeout=300)
    try:
        assert predict(other, sample_jpeg).status_code == 200
        assert predict(server, sample_jpeg).status_code == 200  # the first one is untouched
        pid = launcher.server_pid(other)
        assert pid
    finally:
        assert launcher.stop(other) is True
    assert launcher.server_pid(other) is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{other.inference_url}/ping", timeout=2)
    assert not other.key_file.exists()
    assert predict(server, sample_jpeg).status_code == 200


def test_container_healthcheck_says_healthy_only_when_the_model_answers(server: ServeSettings, tmp_path: Path) -> None:
    """docker/healthcheck.py is the launcher's readiness: the radiograph packed into the .mar must
    get a 200 with a label through the gateway."""
    env = {k: v for k, v in os.environ.items() if k != "XRAY_TOKEN_FILE"}

    def healthcheck(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO_ROOT / "docker" / "healthcheck.py"), "--model-store",
                               str(server.model_store), *args], capture_output=True, text=True, timeout=60, env=env)

    url = ["--inference-url", server.inference_url]
    ok = healthcheck(*url, "--key-file", str(server.key_file))
    assert ok.returncode == 0 and ok.stdout.startswith("healthy:") and "probe=" in ok.stdout, ok.stdout + ok.stderr
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "wrong"}}))
    refused = healthcheck(*url, "--key-file", str(wrong))
    assert refused.returncode == 1 and "401" in refused.stdout, refused.stdout
    missing = healthcheck(*url, "--key-file", str(tmp_path / "absent.json"))
    assert missing.returncode == 1 and "no token" in missing.stdout, missing.stdout
    (port,) = free_ports(1)
    down = healthcheck("--inference-url", f"http://127.0.0.1:{port}", "--key-file", str(server.key_file))
    assert down.returncode == 1 and down.stdout.startswith("unhealthy:"), down.stdout


NOEXEC_START = """
import json, stat, subprocess, sys
from serving import launcher
from serving.settings import ServeSettings
s = ServeSettings.model_validate_json(sys.argv[1])
# A private mount namespace: the tmpfs is gone with it. noexec and owned by someone else, as
# `docker run --tmpfs` and a Kubernetes emptyDir (root-owned, we are not root there) mount it.
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,nosuid,nodev,uid=65534,mode=1777", "tmpfs", str(s.state_dir)],
               check=True)
try:
    label = launcher.start(s, timeout=240).label
    print(json.dumps({"label": label, "run_mode": stat.S_IMODE(s.run_dir.stat().st_mode)}))
finally:
    launcher.stop(s)
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (mounts)")
def test_torchserve_starts_where_its_temp_dir_is_noexec(tmp_path: Path, model_store: Path) -> None:
    """The container's writable dirs are noexec tmpfs; netty's epoll transport (the unix sockets)
    then loads from java_library_path, extracted beforehand as the image does at build time."""
    native = tmp_path / "native"
    extracted = extract_netty_native(native)
    assert all(f.read_bytes()[:4] == b"\x7fELF" for f in extracted)
    s = serve_settings(tmp_path, model_store, java_library_path=native).resolved()
    s.state_dir.mkdir(parents=True)
    r = subprocess.run(["unshare", "-m", sys.executable, "-c", NOEXEC_START, s.model_dump_json()], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["label"] and answer["run_mode"] == 0o700
