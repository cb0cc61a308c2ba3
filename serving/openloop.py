"""Open-loop load: requests sent on a fixed schedule, whether or not earlier ones were answered.

A closed loop (N clients, each waiting for its answer before sending again) slows down with
the server and so never sees the queue it would meet from independent clients (coordinated
omission). Here request i is due at t0 + i / rate; its latency runs from that scheduled time,
so time spent waiting for a free connection or in the server's queue counts. Raw HTTP/1.1 on
persistent connections (asyncio protocols, no HTTP library in the hot path) keeps the
generator cheap; it reports its own CPU time and how late its sends were, so a run where the
generator itself was the bottleneck shows as such. A library.
"""

from __future__ import annotations

import asyncio
import collections
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

P99_TARGET_MS = 50.0


def request_bytes(url: str, path: str, body: bytes, token: str | None,
                  content_type: str = "application/octet-stream") -> bytes:
    """One complete HTTP/1.1 POST (headers + body), sent as is on a keep-alive connection."""
    u = urlsplit(url)
    head = [f"POST {path} HTTP/1.1", f"Host: {u.hostname}:{u.port or 80}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parse_response(buf: bytes | bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes this response takes in buf, connection closes) once buf holds a whole
    response with a Content-Length; None while it is still incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    total = end + 4 + length
    return (status, total, close) if len(buf) >= total else None


@dataclass
class Level:
    """What one rate produced: per request its scheduled time, latency (s) and status (0: failed)."""

    rate: float
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    lateness: list[float] = field(default_factory=list)  # scheduler wake-up minus due time, s
    failures: int = 0
    connections: int = 0
    start: float = 0.0  # loop time of the first due request
    last: float = 0.0  # loop time of the last answer

    @property
    def wall_s(self) -> float:
        return max(self.last - self.start, self.seconds)


class _Connection(asyncio.Protocol):
    def __init__(self, gen: _Generator) -> None:
        self.gen, self.buf, self.transport = gen, bytearray(), None
        self.due: float | None = None  # the scheduled send time of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send(self, due: float, data: bytes) -> None:
        self.due = due
        self.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        parsed = parse_response(self.buf)
        if parsed is None or self.due is None:
            return
        status, used, close = parsed
        del self.buf[:used]
        due, self.due = self.due, None
        self.gen.answered(self, due, status)
        if close:
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _Generator:
    def __init__(self, url: str, requests: list[bytes], max_connections: int) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.requests, self.max_connections = requests, max_connections
        self.idle: list[_Connection] = []
        self.open = 0  # connections open or opening
        self.backlog: collections.deque[tuple[float, int]] = collections.deque()
        self.outstanding = 0
        self.level: Level | None = None
        self.loop = asyncio.get_running_loop()

    async def connect(self) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except OSError:
            self.open -= 1
            if self.backlog:  # nothing will ever answer these: count them as failed
                due, _ = self.backlog.popleft()
                self.finish(due, 0)
            return
        if self.level:
            self.level.connections = max(self.level.connections, self.open)
        self.idle.append(conn)
        self.dispatch()

    def submit(self, due: float, k: int) -> None:
        self.outstanding += 1
        self.backlog.append((due, k))
        self.dispatch()

    def dispatch(self) -> None:
        while self.backlog and self.idle:
            due, k = self.backlog.popleft()
            self.idle.pop().send(due, self.requests[k % len(self.requests)])
        opening = self.open - self.busy() - len(self.idle)
        while self.backlog and self.open < self.max_connections and opening < len(self.backlog):
            self.open += 1  # counted before the connection exists, so a burst never overshoots
            opening += 1
            self.loop.create_task(self.connect())

    def busy(self) -> int:
        return self.outstanding - len(self.backlog)

    def answered(self, conn: _Connection, due: float, status: int) -> None:
        self.finish(due, status)
        self.idle.append(conn)
        self.dispatch()

    def lost(self, conn: _Connection) -> None:
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.due is not None:
            self.finish(conn.due, 0)
        self.dispatch()

    def finish(self, due: float, status: int) -> None:
        self.outstanding -= 1
        if self.level is not None:
            self.level.last = self.loop.time()
            self.level.latencies.append(self.level.last - due)
            self.level.statuses[status] += 1

    async def run(self, rate: float, seconds: float, drain: float) -> Level:
        level = self.level = Level(rate, seconds, connections=self.open)
        n = max(1, int(rate * seconds))
        t0 = level.start = self.loop.time() + 0.01
        i = 0
        while i < n:
            now = self.loop.time()
            while i < n and t0 + i / rate <= now:  # everything due by now, in order
                due = t0 + i / rate
                level.lateness.append(now - due)
                self.submit(due, i)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - self.loop.time()))
        deadline = self.loop.time() + drain
        while self.outstanding and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        level.failures = self.outstanding  # still unanswered after the drain
        self.level = None
        return level

    def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()  # type: ignore[union-attr]


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def summarize(level: Level, wall_s: float, cpu_s: float) -> dict[str, Any]:
    """A rate's figures: answered req/s, latency percentiles from the scheduled times, errors,
    the generator's own CPU and lateness, and whether it meets p99 <= 50 ms with no errors."""
    lat = np.asarray(level.latencies) * 1000
    ok = level.statuses.get(200, 0)
    errors = sum(v for k, v in level.statuses.items() if k != 200) + level.failures
    pct = {q: round(float(np.percentile(lat, q)), 2) if lat.size else float("nan") for q in (50, 90, 99)}
    late = np.asarray(level.lateness) * 1000
    sent = len(level.lateness)
    return {"rate": level.rate, "seconds": level.seconds, "sent": sent, "ok": ok, "errors": errors,
            "statuses": {str(k): v for k, v in sorted(level.statuses.items())},
            "throughput_rps": round(ok / wall_s, 2) if wall_s else 0.0,
            "p50_ms": pct[50], "p90_ms": pct[90], "p99_ms": pct[99],
            "max_ms": round(float(lat.max()), 2) if lat.size else float("nan"),
            "connections": level.connections,
            "generator_cpu_ms_per_request": round(cpu_s * 1000 / sent, 4) if sent else None,
            "generator_cpu_share": round(cpu_s / wall_s, 3) if wall_s else None,
            "send_late_p99_ms": round(float(np.percentile(late, 99)), 2) if late.size else None,
            "meets_target": bool(errors == 0 and lat.size and pct[99] <= P99_TARGET_MS)}


async def sweep_async(url: str, requests: list[bytes], rates: list[float], seconds: float,
                      max_connections: int = 256, drain: float = 10.0, stop_after_misses: int = 2,
                      on_level: Any = None) -> list[dict[str, Any]]:
    """Each rate in turn (ascending) for `seconds`; stops after `stop_after_misses` rates in a row
    miss the target. on_level(rate) -> callable(summary) lets a caller wrap a level (CPU probes)."""
    gen = _Generator(url, requests, max_connections)
    rows, misses = [], 0
    try:
        for rate in rates:
            done = on_level(rate) if on_level else None
            cpu0 = _cpu_s()
            level = await gen.run(rate, seconds, drain)
            row = summarize(level, level.wall_s, _cpu_s() - cpu0)
            if done:
                row |= done(row)
            rows.append(row)
            misses = 0 if row["meets_target"] else misses + 1
            if misses >= stop_after_misses:
                break
    finally:
        gen.close()
    return rows


def sweep(url: str, requests: list[bytes], rates: list[float], seconds: float, **kw: Any) -> list[dict[str, Any]]:
    return asyncio.run(sweep_async(url, requests, rates, seconds, **kw))


def goodput(rows: list[dict[str, Any]]) -> float | None:
    """The highest rate that met p99 <= 50 ms with no errors (None when none did)."""
    met = [r["rate"] for r in rows if r["meets_target"]]
    return max(met) if met else None
