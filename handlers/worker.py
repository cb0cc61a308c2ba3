"""Two changes to TorchServe's Python worker process, made by the handler when it is loaded there.

Measured with `make bench`'s profile and serving.abtest (README, "Tuning"); neither changes what a
request is answered.

- Buffered socket reads. TorchServe's decoder (ts.protocol.otf_message_handler) reads each field
  of each request with its own recv() call: a length, then the bytes, for the request id, every
  header name and value and every parameter, about 35 system calls per image. Its one read
  function is replaced by one that reads through a 64 KiB buffer: the same bytes, in the same
  order, one or two system calls per batch. The protocol is strictly request/response (the
  frontend sends a batch, then waits for its answer), so nothing is pending on the socket when
  the replacement happens during the model's loading.
- Fewer stdout lines. Every line the worker prints is read, parsed and logged again by the Java
  frontend (its per-worker stdout thread was a fifth of the frontend's CPU). Per batch TorchServe
  prints "Backend received inference at: <seconds>" and two gauges, HandlerTime and
  PredictionTime (the last batch's milliseconds: a gauge keeps only its last value); these three
  are dropped, unless the archive asks for profiling (`handler: {profile: true}`). The handler's
  own histograms (XrayPreprocessSeconds, XrayInferenceSeconds, XrayBatchSize) time every batch.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_SCRIPT = "model_service_worker.py"  # TorchServe starts its workers as `python .../ts/model_service_worker.py`
READ_BUFFER = 1 << 16
BATCH_RECEIVED = "Backend received inference at: %d"  # ts.protocol.otf_message_handler.retrieve_msg, per batch
METRICS_LOGGER = "ts.metrics.caching_metric"  # TorchServe's metric lines, one per add_metric call
BATCH_GAUGES = ("[METRICS]HandlerTime.", "[METRICS]PredictionTime.")  # BaseHandler.handle, Service.predict


def in_torchserve_worker() -> bool:
    """True inside a process TorchServe's frontend started (not in tests or offline tools, which
    load the handler into their own process)."""
    return Path(sys.argv[0] if sys.argv else "").name == WORKER_SCRIPT


class BufferedReads:
    """A drop-in for otf_message_handler._retrieve_buffer(conn, length) that reads `conn`
    through a buffer. Returns exactly `length` bytes; exits the worker as TorchServe does when
    the frontend closes the socket."""

    _xray_buffered = True

    def __init__(self, buffer_size: int = READ_BUFFER) -> None:
        self.buffer_size = buffer_size
        self.conn: socket.socket | None = None
        self.reader: io.BufferedReader | None = None

    def __call__(self, conn: socket.socket, length: int) -> bytes:
        if conn is not self.conn or self.reader is None:
            self.conn, self.reader = conn, conn.makefile("rb", buffering=self.buffer_size)
        data = self.reader.read(length) if length > 0 else b""
        if len(data) < length:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        return data


def buffer_protocol_reads(module: object | None = None) -> bool:
    """Replace TorchServe's per-field socket reads with BufferedReads; False when the decoder is
    not the one this was written for (another TorchServe version), which is then left alone."""
    if module is None:
        try:
            from ts.protocol import otf_message_handler as module
        except ImportError:
            return False
    current: Callable | None = getattr(module, "_retrieve_buffer", None)
    if current is None or getattr(current, "_xray_buffered", False):
        return False
    module._retrieve_buffer = BufferedReads()  # type: ignore[attr-defined]
    return True


class DropBatchLines(logging.Filter):
    """Drops TorchServe's per-batch "Backend received" line and its per-batch timing gauges."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == BATCH_RECEIVED:
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith(BATCH_GAUGES))


def quiet_per_batch_lines() -> None:
    """The filter on the two loggers those lines come from (a logger's filters see only its own records)."""
    for logger in (logging.getLogger(), logging.getLogger(METRICS_LOGGER)):
        if not any(isinstance(f, DropBatchLines) for f in logger.filters):
            logger.addFilter(DropBatchLines())


def tune_worker(profiling: bool = False) -> dict[str, bool]:
    """Both changes, inside a TorchServe worker only; what was done, for the worker's log."""
    if not in_torchserve_worker():
        return {"buffered_reads": False, "quiet_batch_lines": False}
    if not profiling:
        quiet_per_batch_lines()
    return {"buffered_reads": buffer_protocol_reads(), "quiet_batch_lines": not profiling}
