"""A real TorchServe Python worker, fed batches over its own socket protocol with no Java frontend.

    python -m serving.workerbench [--mar model_store/xray.mar] [--mar-b OTHER.mar] [--rounds 6]
                                  [--seconds 4] [--batch 8] [--json reports/workerbench.json]

TorchServe's frontend starts `ts/model_service_worker.py` and talks to it over a unix socket:
a load message, then batches of requests (each with its id, headers and body), each answered
with one message (ts.protocol.otf_message_handler). This module plays the frontend's part with
the same bytes (the headers the gateway and TorchServe send), drains the worker's stdout as the
frontend does, and measures the worker process's CPU per image from /proc. Beside it, in
alternating rounds so both see the same background load, the honest limit's pipeline
(serving.limit: the handler's own preprocessing and runner, same batch, same threads) runs in
a process of its own. The difference is what TorchServe's worker loop, its protocol, the
handler's bookkeeping and the metric lines cost per image, without the JVM's noise; with
--mar-b, two archives' workers (two handler versions) alternate too. A library and a CLI.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import psutil

from handlers import constants as C
from handlers.torchserve import read_manifest, read_model_config
from serving import limit
from serving.load import load_bodies, write_json
from training.sources import default_data_dir

HEADERS = {"Authorization": "Bearer " + "k" * 32, "explain": "False", "Host": "localhost",
           "Content-Type": "application/octet-stream", C.CONTENT_TYPE_HEADER: "image/jpeg", "url_path": ""}


def _field(b: bytes) -> bytes:
    return struct.pack("!i", len(b)) + b


def encode_load(model_name: str, model_dir: Path, batch_size: int, handler: str) -> bytes:
    """The load message (otf_message_handler._retrieve_load_msg's frame)."""
    return (b"L" + _field(model_name.encode()) + _field(str(model_dir).encode()) + struct.pack("!i", batch_size)
            + _field(handler.encode()) + struct.pack("!i", -1) + _field(b"") + struct.pack("!?", True))


def encode_batch(bodies: list[bytes]) -> bytes:
    """A predict message as the frontend writes it: per request its id, headers and one 'body' parameter."""
    end = struct.pack("!i", -1)
    out = b"I"
    for body in bodies:
        headers = HEADERS | {"Content-Length": str(len(body))}
        out += _field(str(uuid.uuid4()).encode())
        out += b"".join(_field(k.encode()) + _field(v.encode()) for k, v in headers.items()) + end
        out += _field(b"body") + _field(b"application/octet-stream") + _field(body) + end
    return out + end


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.f = sock.makefile("rb", buffering=1 << 16)

    def bytes(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise ConnectionError("the worker closed its socket")
        return data

    def int(self) -> int:
        return struct.unpack("!i", self.bytes(4))[0]

    def field(self) -> bytes:
        n = self.int()
        return self.bytes(n) if n > 0 else b""


def read_response(r: _Reader) -> tuple[int, str, list[tuple[int, bytes]]]:
    """One answer: (code, message, [(http status, body)] per request)."""
    code, message = r.int(), r.field().decode()
    answers = []
    while (n := r.int()) != -1:
        r.bytes(n)  # request id
        r.field()  # content type
        status = r.int()
        r.field()  # reason phrase
        for _ in range(r.int()):  # response headers
            r.field()
            r.field()
        answers.append((status, r.field()))
    return code, message, answers


class Worker:
    """One `ts/model_service_worker.py` process serving one .mar, driven over its unix socket."""

    def __init__(self, mar: Path, root: Path, batch_size: int) -> None:
        import ts

        self.model_dir = root / "model"
        with zipfile.ZipFile(mar) as z:
            z.extractall(self.model_dir)  # what the frontend does with an archive
        manifest = read_manifest(mar)["model"]
        sock_name = root / ".ts.sock.9000"
        script = Path(ts.__file__).parent / "model_service_worker.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--sock-type", "unix", "--sock-name", str(sock_name), "--metrics-config",
             str(Path(ts.__file__).parent / "configs" / "metrics.yaml")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.model_dir,
            # As the frontend does: the archive's directory first on the path (its handler and handlers/).
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(self.model_dir), os.environ.get("PYTHONPATH")) if p)})
        self.lines: list[bytes] = []  # the last lines, for error messages
        self.line_count = 0
        # The frontend reads the worker's stdout line by line; so does this thread (the worker
        # would block on a full pipe otherwise). The lines are counted, not parsed.
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        while not sock_name.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start: " + b"".join(self.lines[-20:]).decode(errors="replace"))
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(sock_name))
        self.r = _Reader(self.sock)
        self.sock.sendall(encode_load(C.MODEL_NAME, self.model_dir, batch_size, manifest["handler"]))
        try:
            code, message, _ = read_response(self.r)
        except ConnectionError:
            time.sleep(0.5)
            code, message = -1, "the worker closed its socket"
        if code != 200:
            raise RuntimeError(f"load failed: {code} {message}: "
                               + b"".join(self.lines[-20:]).decode(errors="replace"))
        self.ps = psutil.Process(self.proc.pid)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.line_count += 1
            self.lines.append(line)
            if len(self.lines) > 1000:
                del self.lines[:500]

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def predict(self, batch: bytes) -> list[tuple[int, bytes]]:
        self.sock.sendall(batch)
        code, message, answers = read_response(self.r)
        if code != 200:
            raise RuntimeError(f"predict failed: {code} {message}")
        return answers

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_worker(w: Worker, batches: list[bytes], sizes: list[int], seconds: float) -> dict[str, float]:
    lines0, cpu0, t0 = w.line_count, w.cpu_s(), time.perf_counter()
    images = k = 0
    while time.perf_counter() - t0 < seconds:
        answers = w.predict(batches[k % len(batches)])
        if any(status != 200 for status, _ in answers):
            raise RuntimeError(f"a request was refused: {answers[0][1][:200]!r}")
        images += sizes[k % len(batches)]
        k += 1
    cpu = w.cpu_s() - cpu0
    return {"images": images, "cpu_ms_per_image": cpu * 1000 / images, "batches": k,
            "stdout_lines_per_batch": round((w.line_count - lines0) / k, 2) if k else 0.0}


def _limit_rounds(model: Path, threads: int, bodies: list[bytes], batch: int, seconds: float, go: Any,
                  out: Any) -> None:
    """A limit process: one pipeline, one round per `go` token, CPU per image of each round."""
    run, _ = limit._pipeline(model, None, threads)
    chunks = [bodies[i:i + batch] for i in range(0, len(bodies), batch)]
    for c in chunks:
        run(c)
    out.put("ready")
    while go.get():
        cpu0, t0 = time.process_time(), time.perf_counter()
        images = k = 0
        while time.perf_counter() - t0 < seconds:
            run(chunks[k % len(chunks)])
            images += len(chunks[k % len(chunks)])
            k += 1
        out.put({"images": images, "cpu_ms_per_image": (time.process_time() - cpu0) * 1000 / images})


def bench(mars: dict[str, Path], bodies: list[bytes], batch: int, rounds: int, seconds: float) -> dict[str, Any]:
    config = read_model_config(next(iter(mars.values())))
    threads = int((config.get("handler") or {}).get("threads", C.WORKER_THREADS))
    chunks = [bodies[i:i + batch] for i in range(0, len(bodies), batch)]
    encoded, sizes = [encode_batch(c) for c in chunks], [len(c) for c in chunks]
    ctx = mp.get_context("spawn")
    go, out = ctx.Queue(), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="xray-workerbench-") as tmp:
        with zipfile.ZipFile(next(iter(mars.values()))) as z:
            name = read_manifest(next(iter(mars.values())))["model"]["serializedFile"]
            z.extract(name, tmp)
        lim = ctx.Process(target=_limit_rounds, args=(Path(tmp) / name, threads, bodies, batch, seconds, go, out),
                          daemon=True)
        lim.start()
        workers = {}
        try:
            for key, mar in mars.items():
                workers[key] = Worker(mar, Path(tmp) / key, batch)
                run_worker(workers[key], encoded, sizes, 1.0)  # warm-up: arenas, codecs
            out.get(timeout=300)
            rows: dict[str, list[dict[str, float]]] = {k: [] for k in [*mars, "limit"]}
            order = [*mars, "limit"]
            for i in range(rounds):
                for key in order if i % 2 == 0 else order[::-1]:
                    if key == "limit":
                        go.put(True)
                        rows[key].append(out.get(timeout=seconds + 120))
                    else:
                        rows[key].append(run_worker(workers[key], encoded, sizes, seconds))
                    print(f"round {i} {key}: {rows[key][-1]['cpu_ms_per_image']:.4f} CPU ms/img", flush=True)
        finally:
            go.put(False)
            for w in workers.values():
                w.close()
            lim.join(timeout=30)
            if lim.is_alive():
                lim.kill()
    med = {k: round(statistics.median(r["cpu_ms_per_image"] for r in v), 4) for k, v in rows.items()}
    result: dict[str, Any] = {"batch": batch, "threads": threads, "rounds": rounds, "seconds": seconds,
                              "cpu_ms_per_image": med, "rows": rows,
                              "above_limit_ms": {k: round(med[k] - med["limit"], 4) for k in mars},
                              "stdout_lines_per_batch": {k: rows[k][-1]["stdout_lines_per_batch"] for k in mars}}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mar", type=Path, default=C.MODEL_STORE / C.MAR_NAME)
    p.add_argument("--mar-b", type=Path, help="a second archive (another handler version) to alternate with")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    mars = {"a": args.mar} | ({"b": args.mar_b} if args.mar_b else {})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = bench(mars, load_bodies(args.data_dir, args.images), args.batch, args.rounds, args.seconds)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
