"""make bench's arithmetic and its open-loop generator, without TorchServe (no speed is asserted)."""

from __future__ import annotations

import asyncio

import pytest

from serving import limit, openloop, proccpu, profile
from serving.bench import summarize


def test_roles_come_from_the_command_line() -> None:
    java = ["/usr/lib/jvm/java-17/bin/java", "-Xmx1g", "-cp", "x", "org.pytorch.serve.ModelServer"]
    worker = ["/repo/.venv/bin/python", "/site-packages/ts/model_service_worker.py", "--sock-type", "unix"]
    assert proccpu.role_of(java) == "frontend"
    assert proccpu.role_of(worker) == "workers"
    assert proccpu.role_of(["nginx: worker process"]) == "gateway"
    assert proccpu.role_of(["/usr/sbin/nginx", "-c", "/state/nginx.conf"]) == "gateway"
    assert proccpu.role_of(["/repo/.venv/bin/python", "-m", "serving.launcher", "supervise"]) == "other"
    assert proccpu.role_of([]) == "other"


def test_cpu_delta_counts_new_processes_from_zero_and_ignores_vanished_ones() -> None:
    before = {1: ("frontend", 10.0), 2: ("workers", 5.0), 3: ("workers", 7.0)}
    after = {1: ("frontend", 10.5), 2: ("workers", 6.0), 4: ("workers", 0.25), 5: ("gateway", 0.1)}
    spent = proccpu.delta(before, after)
    assert spent == pytest.approx({"gateway": 0.1, "frontend": 0.5, "workers": 1.25, "other": 0.0})
    per = proccpu.per_request_ms(spent, 500)
    assert per["frontend"] == pytest.approx(1.0) and per["workers"] == pytest.approx(2.5)
    assert per["total"] == pytest.approx(3.7)
    assert proccpu.per_request_ms(spent, 0)["total"] is None


def test_this_process_is_found_with_its_cpu_time() -> None:
    import os

    snap = proccpu.snapshot(os.getpid())
    assert os.getpid() in snap and snap[os.getpid()][1] > 0
    assert proccpu.snapshot(2**22 + 12345) == {}  # no such process: nothing, no exception


def test_jvm_threads_are_grouped_by_pool() -> None:
    assert proccpu.thread_group("epollEventLoopG") == proccpu.thread_group("epollEventLoopG") == "epollEventLoopG"
    assert proccpu.thread_group("C2 CompilerThre") == proccpu.thread_group("C1 CompilerThre") == "CN CompilerThre"
    before = {10: ("GC Thread#N", 1.0), 11: ("GC Thread#N", 1.0), 12: ("epollEventLoopG", 2.0)}
    after = {10: ("GC Thread#N", 1.1), 11: ("GC Thread#N", 1.3), 12: ("epollEventLoopG", 2.1), 13: ("VM Thread", 0.05)}
    top = proccpu.top_threads(before, after, 100, n=2)
    assert top == pytest.approx({"GC Thread#N": 4.0, "epollEventLoopG": 1.0, "rest": 0.5})


def test_limit_adds_rates_of_side_by_side_processes() -> None:
    parts = [{"images": 1000, "wall_s": 2.0, "cpu_s": 1.9}, {"images": 800, "wall_s": 2.0, "cpu_s": 1.7}]
    lim = limit.combine(parts)
    assert lim["throughput_rps"] == pytest.approx(900.0)
    assert lim["cpu_ms_per_image"] == pytest.approx(2.0)


def test_http_response_parsing() -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nConnection: keep-alive\r\n\r\nhello"
    assert openloop.parse_response(raw[:-1]) is None
    assert openloop.parse_response(raw + b"HTTP/1.1") == (200, len(raw), False)
    closing = b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\n"
    assert openloop.parse_response(closing) == (503, len(closing), True)
    req = openloop.request_bytes("http://127.0.0.1:8080", "/predictions/xray", b"abc", "tok")
    assert req.startswith(b"POST /predictions/xray HTTP/1.1\r\n") and req.endswith(b"\r\n\r\nabc")
    assert b"Authorization: Bearer tok\r\n" in req and b"Content-Length: 3\r\n" in req


async def _serve(delay: float, statuses: list[int]) -> tuple[asyncio.Server, int]:
    """A keep-alive HTTP/1.1 server that answers each request after `delay` s, one at a time per
    connection; statuses are handed out in turn."""
    turn = iter(statuses * 10_000)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
                              if k.lower() == b"content-length")
                await reader.readexactly(length)
                await asyncio.sleep(delay)
                status = next(turn)
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n{{}}".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_open_loop_counts_queueing_from_the_scheduled_time() -> None:
    async def run() -> tuple[list[dict], list[dict]]:
        server, port = await _serve(0.02, [200])
        url = f"http://127.0.0.1:{port}"
        reqs = [openloop.request_bytes(url, "/p", b"x" * 100, None)]
        async with server:
            free = await openloop.sweep_async(url, reqs, [50], 0.4, max_connections=64)
            # One connection, 20 ms per answer, a request every 10 ms: the queue grows, and so
            # must the latencies, though each answer alone takes 20 ms.
            queued = await openloop.sweep_async(url, reqs, [100], 0.4, max_connections=1, stop_after_misses=9)
        return free, queued

    free, queued = asyncio.run(run())
    assert free[0]["sent"] == free[0]["ok"] == 20 and free[0]["errors"] == 0
    assert free[0]["p50_ms"] >= 19  # no answer comes sooner than the server's 20 ms
    assert queued[0]["ok"] == 40 and queued[0]["connections"] == 1
    # The 40th request, due at 390 ms, is answered after 40 answers of 20 ms (800 ms) at the earliest.
    assert queued[0]["p99_ms"] > 250
    assert not queued[0]["meets_target"]


def test_open_loop_counts_error_statuses() -> None:
    async def run() -> list[dict]:
        server, port = await _serve(0.0, [200, 503])
        url = f"http://127.0.0.1:{port}"
        async with server:
            return await openloop.sweep_async(url, [openloop.request_bytes(url, "/p", b"x", None)], [100], 0.2)

    row = asyncio.run(run())[0]
    assert row["errors"] == row["statuses"]["503"] > 0 and not row["meets_target"]
    assert openloop.goodput([row]) is None


def test_goodput_and_summary_ratios() -> None:
    rows = [{"rate": 100, "meets_target": True}, {"rate": 200, "meets_target": True},
            {"rate": 300, "meets_target": False}]
    assert openloop.goodput(rows) == 200
    lim = {"throughput_rps": 1000.0, "cpu_ms_per_image": 2.0}
    closed = [{"concurrency": 1, "throughput_rps": 200.0, "p50_ms": 5.0},
              {"concurrency": 32, "throughput_rps": 850.0, "p50_ms": 30.0,
               "server_cpu_ms": {"gateway": 0.5, "frontend": 1.0, "workers": 2.0, "other": 0.0, "total": 3.5},
               "frontend_jit_ms": 0.5}]
    s = summarize(lim, {"p50_ms": 2.0}, closed, rows)
    assert s["throughput_ratio"] == pytest.approx(0.85) and s["throughput_ok"]
    assert s["cpu_ratio"] == pytest.approx(1.75) and not s["cpu_ok"]
    assert s["cpu_ratio_by_role"]["workers"] == pytest.approx(1.0)
    assert s["cpu_ratio_without_jit"] == pytest.approx(1.5)
    assert s["goodput_rps"] == 200 and s["goodput_ratio"] == pytest.approx(0.2)
    assert s["latency_budget_ms"] == pytest.approx(8.0) and s["latency_ok"]


def test_worker_samples_are_folded_into_stages() -> None:
    raw = ("<module> (ts/model_service_worker.py:290);handle_connection (ts/model_service_worker.py:190);"
           "TorchModelServiceWorker.handle_connection (/x/site-packages/ts/model_service_worker.py:191) 5\n"
           "<module> (ts/model_service_worker.py:290);Service.predict (/x/site-packages/ts/service.py:135);"
           "XrayHandler.inference (/m/handlers/xray_handler.py:80);OnnxRunner.run (/m/handlers/backends.py:101);"
           "Session.run (/x/site-packages/onnxruntime/capi/onnxruntime_inference_collection.py:266) 60\n"
           "<module> (a.py:1);XrayHandler.preprocess (/m/handlers/xray_handler.py:70);"
           "read_request (/m/handlers/request.py:135);preprocess (/tmp/models/abc/handlers/preprocess.py:300);"
           "_decode_pil (/tmp/models/abc/handlers/preprocess.py:90) 25\n"
           "<module> (a.py:1);XrayHandler._metric (/m/handlers/xray_handler.py:150);"
           "Logger.info (/usr/lib/python3.11/logging/__init__.py:1489) 10\n"
           "garbage line\n")
    samples = profile.parse_pyspy_raw(raw)
    assert len(samples) == 4
    assert samples[1][0][0] == "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py)"
    folded = profile.fold_workers(samples)
    assert folded["samples"] == 100
    assert folded["stages"] == {"model (onnxruntime / torch)": 60.0,
                                "image decode + resize (handlers.preprocess)": 25.0,
                                "metrics and logging lines": 10.0, "TorchServe worker loop (socket send)": 5.0}


def test_jvm_samples_are_folded_into_frontend_parts() -> None:
    text = """
jdk.ExecutionSample {
  startTime = 12:16:13.210
  sampledThread = "W-18211-xray_1.0-c1f06ec0-stdout" (javaThreadId = 23)
  state = "STATE_RUNNABLE"
  stackTrace = [
    org.apache.logging.log4j.core.Logger.log(Level, String) line: 162
    org.apache.logging.slf4j.Log4jLogger.info(String) line: 1
    org.pytorch.serve.wlm.WorkerLifeCycle$ReaderThread.run() line: 300
  ]
}

jdk.ExecutionSample {
  sampledThread = "epollEventLoopGroup-3-1" (javaThreadId = 31)
  stackTrace = [
    io.netty.handler.codec.http.HttpObjectDecoder.decode(ChannelHandlerContext, ByteBuf, List) line: 1
    io.netty.channel.epoll.EpollEventLoop.run() line: 2
    ...
  ]
}
"""
    samples = profile.parse_jfr_samples(text)
    assert [s[0][-1] for s in samples] == ["thread:W-N-xray_N.N-cNfNecN-stdout", "thread:epollEventLoopGroup-N-N"]
    folded = profile.fold_frontend(samples)
    assert folded["stages"] == {"log4j (log lines)": 50.0, "HTTP decode (netty)": 50.0}
    assert folded["threads"]["epollEventLoopGroup-N-N"] == 50.0
    md = "\n".join(profile.markdown({"seconds": 5, "concurrency": 32, "workers": {"error": "no py-spy"},
                                     "frontend": folded, "server_cpu_ms": {"workers": 1.5}}))
    assert "not profiled (no py-spy)" in md and "| log4j (log lines) | 50.0 |" in md
