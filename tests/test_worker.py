"""handlers/worker.py: TorchServe's own decoder, reading through the buffer, sees the same messages."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import types
from pathlib import Path

import pytest
from ts.protocol import otf_message_handler as otf

from handlers import constants as C
from handlers import worker


def field(b: bytes) -> bytes:
    return struct.pack("!i", len(b)) + b


def encode_batch(requests: list[tuple[str, dict[str, str], bytes]]) -> bytes:
    """A predict message as TorchServe's frontend writes it (ModelRequestEncoder): per request its
    id, its headers, then its parameters, each list closed by -1."""
    end = struct.pack("!i", -1)
    out = b"I"
    for rid, headers, body in requests:
        out += field(rid.encode())
        out += b"".join(field(k.encode()) + field(v.encode()) for k, v in headers.items()) + end
        out += field(b"body") + field(b"application/octet-stream") + field(body) + end
    return out + end


BATCHES = [[(f"id-{b}-{i}", {"Content-Type": "application/octet-stream", "explain": "False",
                              "x-xray-content-type": "image/png", "X-Operating-Point": "pt" * i},
             bytes(range(256)) * (40 * i + 1)) for i in range(5)] for b in range(3)]


def read_all(reader: object, chunk: int) -> list:
    """The messages TorchServe's retrieve_msg decodes with `reader` as its read function, while the
    other end writes the batches `chunk` bytes at a time (reads then end mid-field, mid-header)."""
    a, b = socket.socketpair()
    stream = b"".join(encode_batch(batch) for batch in BATCHES)

    def send() -> None:
        for i in range(0, len(stream), chunk):
            a.sendall(stream[i:i + chunk])

    sender = threading.Thread(target=send)
    sender.start()
    saved = otf._retrieve_buffer
    otf._retrieve_buffer = reader
    try:
        msgs = [otf.retrieve_msg(b) for _ in BATCHES]
    finally:
        otf._retrieve_buffer = saved
        sender.join()
        a.close()
        b.close()
    return msgs


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_buffered_reads_decode_what_torchserve_decodes(chunk: int) -> None:
    ours = read_all(worker.BufferedReads(buffer_size=64), chunk)
    theirs = read_all(otf._retrieve_buffer, chunk)
    assert [cmd for cmd, _ in ours] == [b"I"] * len(BATCHES)
    assert ours == theirs
    first = ours[0][1][1]
    assert first["requestId"] == b"id-0-1" and first["parameters"][0]["value"] == bytes(range(256)) * 41


def test_buffered_reads_exit_like_torchserve_when_the_frontend_goes() -> None:
    a, b = socket.socketpair()
    a.sendall(struct.pack("!i", 5) + b"ab")
    a.close()
    read = worker.BufferedReads()
    assert read(b, 4) == struct.pack("!i", 5)
    with pytest.raises(SystemExit):
        read(b, 5)
    b.close()


def test_the_decoder_is_replaced_once_and_only_where_it_exists() -> None:
    module = types.SimpleNamespace(_retrieve_buffer=lambda conn, n: b"")
    assert worker.buffer_protocol_reads(module)
    assert isinstance(module._retrieve_buffer, worker.BufferedReads)
    assert not worker.buffer_protocol_reads(module)  # already buffered
    assert not worker.buffer_protocol_reads(types.SimpleNamespace())  # another TorchServe: left alone


def test_only_the_per_batch_lines_are_dropped() -> None:
    f = worker.DropBatchLines()

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("x", logging.INFO, __file__, 1, msg, args or None, None)

    assert not f.filter(record(worker.BATCH_RECEIVED, 1796559080))
    assert not f.filter(record("[METRICS]HandlerTime.Milliseconds:13.45|#ModelName:xray,Level:Model|#type:GAUGE"))
    assert not f.filter(record("[METRICS]PredictionTime.Milliseconds:16.81|#ModelName:xray|#type:GAUGE"))
    assert f.filter(record("[METRICS]XrayInferenceSeconds.Seconds:0.0017|#ModelName:xray|#type:HISTOGRAM"))
    assert f.filter(record("[METRICS]XrayBatchSize.Count:8.0|#ModelName:xray|#type:HISTOGRAM"))
    assert f.filter(record("Invoking custom service failed."))


def test_tests_and_offline_tools_are_not_tuned() -> None:
    assert not worker.in_torchserve_worker()
    assert worker.tune_worker() == {"buffered_reads": False, "quiet_batch_lines": False}
    assert not any(isinstance(f, worker.DropBatchLines) for f in logging.getLogger().filters)


def test_a_real_worker_answers_as_the_handler_in_process_and_prints_three_lines_a_batch(
        model_store: Path, data_dir: Path, tmp_path: Path) -> None:
    """TorchServe's own worker process, fed over its socket by serving.workerbench (no Java): the
    buffered reads decode every request, the answers equal the in-process handler's bit for bit,
    and per batch only the handler's three histogram lines reach stdout."""
    from serving.inprocess import InProcessWorker
    from serving.workerbench import Worker, encode_batch

    bodies = [p.read_bytes() for p in sorted((data_dir / "test").rglob("*.jp*g"))[:8]]
    worker = Worker(model_store / C.MAR_NAME, tmp_path, len(bodies))
    try:
        assert any(b"'buffered_reads': True, 'quiet_batch_lines': True" in line for line in worker.lines)
        lines0 = worker.line_count
        for _ in range(3):
            served = worker.predict(encode_batch(bodies))
        deadline = time.monotonic() + 10
        while worker.line_count < lines0 + 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more may come
        printed = worker.lines[-(worker.line_count - lines0):]
    finally:
        worker.close()
    assert [line.split(b".")[0] for line in printed] == [b"[METRICS]XrayPreprocessSeconds",
                                                         b"[METRICS]XrayInferenceSeconds",
                                                         b"[METRICS]XrayBatchSize"] * 3
    with InProcessWorker.open(model_store / C.MAR_NAME) as local:
        offline = local.predict_many([(str(i), b, "image/jpeg") for i, b in enumerate(bodies)])
    assert [status for status, _ in served] == [a.status for a in offline]
    assert [json.loads(body) for _, body in served] == [a.body for a in offline]
