"""What evaluate, bench and soak share: the test images as request bodies, a load loop against
the endpoint, TorchServe's Prometheus counters, and latency percentiles. A library: CLIs import
it, it imports no CLI.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from serving.client import Body, XrayClient, XrayError
from training.sources import detect_format, iter_arrays, list_image_folder, stratified_subset

Item = tuple[str, Body, int]  # name (relative to the data dir), body, label


def percentiles_ms(latencies_s: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Latencies in seconds -> {"p50": ms, ..., "mean": ms, "max": ms}; NaN for no latencies."""
    if not latencies_s:
        return {**{f"p{q}": float("nan") for q in qs}, "mean": float("nan"), "max": float("nan")}
    ms = np.asarray(latencies_s) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in qs} | {
        "mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2)}


def write_json(path: Path | None, doc: Any) -> None:
    """A tool's result as JSON at PATH (its folder made), when one was asked for."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def list_items(data_dir: Path, split: str) -> list[Item]:
    """Every image of the split: the files of an ImageFolder tree or a labelled folder, or the arrays
    of the course's .npy files or a MedMNIST .npz (sent as .npy bodies), named as training.sources
    names them. FileNotFoundError when the data dir is none of these."""
    if detect_format(data_dir) in ("imagefolder", "labelled"):
        return [(path.relative_to(data_dir).as_posix(), path, label)
                for path, label in list_image_folder(data_dir, split)]
    return [(name, npy_bytes(arr), label) for name, arr, label in iter_arrays(data_dir, split)]


def stratified(items: list[Item], limit: int | None, seed: int = 0) -> list[Item]:
    """At most `limit` items, each class in its share (training.sources.stratified_subset)."""
    if not limit or limit >= len(items):
        return items
    return [items[i] for i in stratified_subset([label for _, _, label in items], limit, seed)]


def load_bodies(data_dir: Path, n: int) -> list[bytes]:
    """n test images of both classes, as the bytes a client would send."""
    items = stratified(list_items(data_dir, "test"), n)
    return [body.read_bytes() if isinstance(body, Path) else body for _, body, _ in items]


def metric_sum(metrics_url: str, name: str) -> float | None:
    """A Prometheus metric on TorchServe's metrics port, summed over its labels; None if absent."""
    try:
        text = httpx.get(f"{metrics_url.rstrip('/')}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} ([0-9.eE+-]+)$", text, re.M)]
    return sum(values) if values else None


def batch_counts(metrics_url: str) -> tuple[float | None, float | None]:
    """(batches, requests) the handler has seen: the count and the sum of its XrayBatchSize histogram."""
    return metric_sum(metrics_url, "XrayBatchSize_count"), metric_sum(metrics_url, "XrayBatchSize_sum")


async def endpoint_level(client: XrayClient, bodies: list[bytes], requests: int, seconds: float) -> dict[str, Any]:
    """`client.concurrency` requests in flight, cycling through `bodies`, until `requests` were
    sent or `seconds` passed: throughput, p50/p99 latency, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                await client.predict(body)
                latencies.append(time.perf_counter() - t0)
            except XrayError as exc:
                errors.append(str(exc))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(client.concurrency)))
    wall = time.perf_counter() - t0
    pct = percentiles_ms(latencies, (50, 99))
    return {"concurrency": client.concurrency, "requests": sent, "errors": len(errors), "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 2), "p50_ms": pct["p50"],
            "p99_ms": pct["p99"], "first_error": errors[0] if errors else None}


# wrk cycles through the same image bodies; done() prints the exact percentiles as one JSON line.
WRK_SCRIPT = """
local files = {%(files)s}
local bodies = {}
for i, path in ipairs(files) do local f = io.open(path, "rb"); bodies[i] = f:read("*all"); f:close() end
local headers = {["Content-Type"] = "application/octet-stream", ["Authorization"] = "Bearer %(token)s"}
local n = 0
request = function()
  n = n %% #bodies + 1
  return wrk.format("POST", nil, headers, bodies[n])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests": %%d, "non_2xx": %%d, "socket_errors": %%d, "duration_us": %%d, '
    .. '"p50_us": %%d, "p99_us": %%d}\\n', summary.requests, e.status, e.connect + e.read + e.write + e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_level(url: str, token: str | None, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """One concurrency level driven by wrk (C, one thread): the Python client cannot load 2 cores' worth."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, body in enumerate(bodies):
            files.append(Path(tmp) / f"{i}.bin")
            files[-1].write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT % {"files": ", ".join(f'"{f}"' for f in files), "token": token or ""})
        out = subprocess.run(["wrk", "-t", "1", "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "30s",
                              "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    w = json.loads(line[4:])
    ok = w["requests"] - w["non_2xx"]
    return {"concurrency": concurrency, "requests": w["requests"], "errors": w["non_2xx"] + w["socket_errors"],
            "throughput_rps": round(ok / (w["duration_us"] / 1e6), 2), "p50_ms": round(w["p50_us"] / 1000, 2),
            "p99_ms": round(w["p99_us"] / 1000, 2), "first_error": None, "load": "wrk"}
