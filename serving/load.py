"""What evaluate, bench and soak share: the test images as request bodies, a load loop against
the endpoint, TorchServe's Prometheus counters, and latency percentiles. A library: CLIs import
it, it imports no CLI.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from handlers.schemas import CLASS_NAMES
from serving.client import Body, XrayClient, XrayError
from training.sources import detect_format, find_npy_split, list_image_folder, stratified_subset

Item = tuple[str, Body, int]  # name (relative to the data dir), body, label


def percentiles_ms(latencies_s: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Latencies in seconds -> {"p50": ms, ..., "mean": ms, "max": ms}; NaN for no latencies."""
    if not latencies_s:
        return {**{f"p{q}": float("nan") for q in qs}, "mean": float("nan"), "max": float("nan")}
    ms = np.asarray(latencies_s) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in qs} | {
        "mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2)}


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def list_items(data_dir: Path, split: str) -> list[Item]:
    """Every image of the split: files of an ImageFolder tree, or the arrays of the course's .npy
    files. FileNotFoundError when the data dir holds neither."""
    if detect_format(data_dir) == "imagefolder":
        return [(path.relative_to(data_dir).as_posix(), path, label)
                for path, label in list_image_folder(data_dir, split)]
    found = find_npy_split(data_dir, split) if detect_format(data_dir) == "npy" else None
    if found is None:
        raise FileNotFoundError(f"{data_dir}: no {split} images (ImageFolder or course .npy files)")
    items: list[Item] = []
    for label, path in enumerate(found):
        arr = np.load(path, allow_pickle=False)
        arr = arr[None] if arr.ndim == 2 else arr
        # The same names as training.sources.iter_split gives these arrays.
        items += [(f"{split}/{CLASS_NAMES[label]}/{i:05d}", npy_bytes(a), label) for i, a in enumerate(arr)]
    return items


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
