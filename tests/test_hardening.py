"""Issue 12, fast reproductions: no client can take the server down, spoil its batch-mates, lose an
answer or be signalled by a stale pid file. Each case is bounded in count and time; the heavy
versions (thousands of connections, minutes of overload) are in `make chaos` (serving/chaos.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from handlers.schemas import ErrorBody, Prediction
from serving import launcher, supervisor
from serving.client import XrayClient
from serving.settings import ServeSettings
from tests.helpers import keys, serve_settings, workers

pytestmark = [pytest.mark.server, pytest.mark.slow]


def post(s: ServeSettings, body: bytes, path: str = "predictions", **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {keys(s)['inference']}", **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(f"{s.inference_url}/{path}/xray", content=body if "files" not in kw else None,
                      headers=headers, timeout=60, **kw)


def wait_ready(s: ServeSettings, sample: bytes, limit: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        try:
            if post(s, sample).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready again after {limit} s")


def ts_starts(s: ServeSettings) -> int:
    return supervisor.read_state(s)["torchserve_starts"]


def test_large_bodies_cannot_exhaust_the_heap(server: ServeSettings, sample_jpeg: bytes) -> None:
    """12.1: ~40 concurrent 15.9 MB bodies exhausted the 1 GB heap and TorchServe exited. The gateway
    lets max_large_inflight large bodies through at once (the heap is sized for them) and sheds the
    rest with 503 + Retry-After; TorchServe never restarts."""
    starts = ts_starts(server)
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(1024) * (15_900_000 // 1024)
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: post(server, body, headers={"Content-Type": "image/png"}), range(40)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {400, 503}, codes
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] and ErrorBody.model_validate(r.json()).type == "overloaded"
    assert post(server, sample_jpeg).status_code == 200
    assert ts_starts(server) == starts, "TorchServe was restarted: the heap ran out"
    print(f"40 x 15.9 MB: {codes.count(400)} answered 400 by the handler, {codes.count(503)} shed with 503")


def test_a_bad_explain_target_leaves_its_batch_mates_alone(server: ServeSettings, sample_jpeg: bytes) -> None:
    """12.2: a non-UTF-8 (or JSON) multipart `target` made its whole batch answer 503."""
    reference = Prediction.model_validate(post(server, sample_jpeg, headers={"Content-Type": "image/jpeg"}).json())
    bad_targets = [("t.bin", b"\xff\xfe\xfd", "application/octet-stream"), ("t.json", b'{"a": 1}', "application/json")]
    with ThreadPoolExecutor(8) as pool:
        for target in bad_targets:
            good = [pool.submit(post, server, sample_jpeg, headers={"Content-Type": "image/jpeg"}) for _ in range(7)]
            bad = pool.submit(post, server, b"", "explanations",
                              files={"data": ("x.jpeg", sample_jpeg, "image/jpeg"), "target": target})
            assert bad.result().status_code == 400, bad.result().text
            assert ErrorBody.model_validate(bad.result().json()).type == "invalid_target"
            for f in good:
                assert f.result().status_code == 200, f.result().text
                assert Prediction.model_validate(f.result().json()).probability == pytest.approx(
                    reference.probability, abs=1e-6)


def test_logs_do_not_grow_per_request(server: ServeSettings, sample_jpeg: bytes) -> None:
    """12.8: torchserve.out grew ~1 KB per request, never rotated. Now only start-up and crashes
    reach it; the rolled log4j2 files take the rest."""
    out = server.log_dir / "torchserve.out"
    before = out.stat().st_size
    with ThreadPoolExecutor(8) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: post(server, sample_jpeg), range(100)))
    assert out.stat().st_size - before < 1024
    log4j = (server.run_dir / "log4j2.xml").read_text()
    assert log4j.count("SizeBasedTriggeringPolicy") == 5 and "Console" not in log4j


def test_a_killed_worker_answers_503_with_retry_after(server: ServeSettings, sample_jpeg: bytes) -> None:
    """12.6: a killed worker's batch answered 500 "Worker died." (not retried by the client). The
    gateway turns it into 503 + Retry-After, and nothing else than 200/503 is seen meanwhile."""
    pid = workers(server)[0]["pid"]
    seen: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            seen.append(post(server, sample_jpeg, headers={"Content-Type": "image/jpeg"}))

    threads = [threading.Thread(target=load) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join()
    codes = [r.status_code for r in seen]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    for r in seen:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and ErrorBody.model_validate(r.json()).type == "unavailable"
    print(f"worker killed under load: {codes.count(200)} x 200, {codes.count(503)} x 503 (retryable)")
    deadline = time.monotonic() + 60
    while not all(w["status"] == "READY" for w in workers(server)) and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_crashed_torchserve_is_restarted(server: ServeSettings, sample_jpeg: bytes) -> None:
    """12.1 (supervision): the JVM exiting (as -XX:+ExitOnOutOfMemoryError makes it) left no server.
    The supervisor restarts it; meanwhile the gateway answers 503 + Retry-After."""
    starts = ts_starts(server)
    java = [p for p in psutil.process_iter(["cmdline"]) if str(server.state_dir) in " ".join(p.info["cmdline"] or [])
            and "org.pytorch.serve.ModelServer" in " ".join(p.info["cmdline"] or [])]
    assert len(java) == 1
    java[0].kill()
    time.sleep(0.5)
    r = post(server, sample_jpeg)
    assert r.status_code in (200, 503), r.text  # 200 only if it was back within half a second
    if r.status_code == 503:
        assert r.headers["retry-after"] and ErrorBody.model_validate(r.json()).type == "unavailable"
    recovery = wait_ready(server, sample_jpeg)
    assert ts_starts(server) == starts + 1
    deadline = time.monotonic() + 60
    while len([w for w in workers(server) if w["status"] == "READY"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"TorchServe killed: answering again after {recovery + 0.5:.1f} s")


def test_a_stale_pid_file_never_signals_a_stranger(tmp_path: Path) -> None:
    """12.9: a pid file whose pid now belongs to another process: `start` refused and `stop` SIGKILLed
    that process. The pid file records start time and command line; a stranger never matches."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        s = ServeSettings(state_dir=tmp_path / "state", log_dir=tmp_path / "logs").resolved()
        s.run_dir.mkdir(parents=True)
        real = supervisor.Identity.of(stranger.pid)
        fake = supervisor.Identity(stranger.pid, real.create_time - 100, [sys.executable, "-m", "serving.launcher"])
        fake.write(s.run_dir / supervisor.SUPERVISOR_PID)
        assert launcher.server_pid(s) is None  # so `start` goes ahead
        assert launcher.stop(s) is False
        assert not fake.signal(signal.SIGKILL)
        time.sleep(0.2)
        assert stranger.poll() is None, "the unrelated process was signalled"
        assert real.alive() and not fake.alive()
    finally:
        stranger.kill()
        stranger.wait()


def _hold(s: ServeSettings, n: int, token: str) -> list[socket.socket]:
    """n requests in flight at the gateway: headers sent, the body only half."""
    socks = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", s.inference_port))
        c.sendall(f"POST /predictions/xray HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                  "Content-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n".encode() + b"\xff" * 10)
        socks.append(c)
    time.sleep(0.3)
    return socks


def test_gateway_limits_timeouts_rotation_and_drain(tmp_path: Path, model_store: Path, sample_jpeg: bytes) -> None:
    """One small server with tight limits (4 in flight, 64 connections, 2 s client timeouts) and a
    token file:
    - 12.10 overload: past the limit, 503 at once with Retry-After and a true message (no scale API);
    - 12.5 slow and idle clients are cut after the timeout; 100 idle connections do not lock out a new client;
    - a rotated token file is read again, the client follows through the key file;
    - 12.10 `stop` drains: a request in flight when stop begins is answered 200."""
    token_file = tmp_path / "tokens"
    old, new = "a" * 8 + "OLDTOKEN" * 3, "b" * 8 + "NEWTOKEN" * 3
    token_file.write_text(f"# one per line\n{old}\n")
    s = serve_settings(tmp_path, model_store, max_inflight=4, max_large_inflight=2, max_connections=64,
                       client_timeout_s=2, token_file=token_file).resolved()
    launcher.start(s, timeout=300)
    try:
        assert keys(s)["inference"] == old
        # overload
        held = _hold(s, 4, old)
        t0 = time.monotonic()
        r = post(s, sample_jpeg)
        assert r.status_code == 503 and time.monotonic() - t0 < 5.0, r.text  # at once, not after a queue
        err = ErrorBody.model_validate(r.json())
        assert err.type == "overloaded" and "scale" not in err.message and r.headers["retry-after"] == "1"
        assert httpx.get(f"{s.inference_url}/ping", timeout=5).status_code == 200  # liveness is never shed
        # the held requests are slow clients: cut after client_timeout_s, and their slots come back
        time.sleep(s.client_timeout_s + 1.5)
        for c in held:
            c.settimeout(2)
            try:
                data = c.recv(4096)
            except ConnectionResetError:  # reset_timedout_connection: closed with a reset
                data = b""
            assert data == b"" or b" 408 " in data.split(b"\r\n")[0], data[:100]
            c.close()
        assert post(s, sample_jpeg).status_code == 200
        # 100 idle connections (over max_connections) do not lock a new client out
        idle = [socket.create_connection(("127.0.0.1", s.inference_port)) for _ in range(100)]
        try:
            assert post(s, sample_jpeg).status_code == 200
        finally:
            for c in idle:
                c.close()
        # token rotation
        token_file.write_text(f"{new}\n")
        deadline = time.monotonic() + 10
        while keys(s)["inference"] != new and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # nginx's reload
        assert httpx.post(f"{s.inference_url}/predictions/xray", content=sample_jpeg, timeout=10,
                          headers={"Authorization": f"Bearer {old}"}).status_code == 401
        async def predict() -> tuple[Prediction, int]:
            async with XrayClient(s.inference_url, token=old, key_file=s.key_file, retries=1) as c:
                return await c.predict_counted(sample_jpeg)

        _, attempts = asyncio.run(predict())
        assert attempts == 2  # refused once, key file read again, answered
        # drain on stop: a request in flight when stop begins still gets its answer
        c = socket.create_connection(("127.0.0.1", s.inference_port))
        head = (f"POST /predictions/xray HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {new}\r\nConnection: close\r\n"
                f"Content-Type: image/jpeg\r\nContent-Length: {len(sample_jpeg)}\r\n\r\n").encode()
        c.sendall(head + sample_jpeg[:100])
        time.sleep(0.3)
        stopper = threading.Thread(target=launcher.stop, args=(s,))
        stopper.start()
        time.sleep(1.0)
        c.sendall(sample_jpeg[100:])
        c.settimeout(30)
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
        c.close()
        stopper.join(120)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert launcher.server_pid(s) is None
    finally:
        launcher.stop(s)
