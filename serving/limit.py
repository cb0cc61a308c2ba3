"""The honest in-process limit: the handler's own pipeline on every core the server uses.

The server runs W model workers of T threads each. The limit runs the same layout: W processes
(spawned, each with its own ONNX Runtime session of T intra-op threads), each decoding with
handlers.preprocess (the function the handler calls) and running handlers.backends' runner on
batches of the server's batch size, all started together and stopped together. Reported:
images/s (all processes together), CPU ms per image (from the processes' own CPU clocks), and
a single-image latency for the latency budget. A library.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from handlers.backends import load_runner, pneumonia_probability
from handlers.preprocess import preprocess


def _pipeline(model: Path, backend: str | None, threads: int) -> tuple[Any, Any]:
    runner = load_runner(model, backend, None, threads)
    card = runner.card

    def run(chunk: list[bytes]) -> np.ndarray:
        x = np.stack([preprocess(b, card.input_size, card.mean, card.std) for b in chunk])
        return pneumonia_probability(runner(x), card.head)

    return run, card


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _worker(model: Path, backend: str | None, threads: int, bodies: list[bytes], batch_size: int,
            seconds: float, barrier: Any, results: Any) -> None:
    run, _ = _pipeline(model, backend, threads)
    batches = [bodies[i : i + batch_size] for i in range(0, len(bodies), batch_size)]
    for chunk in batches:  # warm-up: one pass (ORT's arena, Pillow's codecs)
        run(chunk)
    barrier.wait()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    images, k = 0, 0
    while time.perf_counter() - t0 < seconds:
        chunk = batches[k % len(batches)]
        run(chunk)
        images += len(chunk)
        k += 1
    results.put({"images": images, "wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0})


def combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """Per-process results -> the limit: images/s summed over the processes (they ran side by
    side over the same window) and CPU ms per image over all of them."""
    images = sum(p["images"] for p in parts)
    cpu = sum(p["cpu_s"] for p in parts)
    rate = sum(p["images"] / p["wall_s"] for p in parts if p["wall_s"] > 0)
    return {"images": images, "throughput_rps": round(rate, 2),
            "cpu_ms_per_image": round(cpu * 1000 / images, 3) if images else float("nan"),
            "cpu_s": round(cpu, 3), "wall_s": round(max((p["wall_s"] for p in parts), default=0.0), 3)}


def average(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several limit runs (the same layout at different moments) -> their mean img/s and CPU ms per
    image, the runs beside."""
    out = dict(runs[0])
    for key in ("throughput_rps", "cpu_ms_per_image"):
        out[key] = round(sum(r[key] for r in runs) / len(runs), 3)
    out["runs"] = [{k: r[k] for k in ("throughput_rps", "cpu_ms_per_image", "images", "wall_s")} for r in runs]
    out.pop("per_process", None)
    return out


def parallel_limit(model: Path, bodies: list[bytes], batch_size: int, processes: int, threads: int,
                   seconds: float, backend: str | None = None) -> dict[str, Any]:
    """`processes` spawned pipelines of `threads` ORT threads each, side by side for `seconds`."""
    ctx = mp.get_context("spawn")  # no fork of a process that may hold ORT or torch threads
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(model, backend, threads, bodies, batch_size, seconds, barrier,
                                                results), daemon=True) for _ in range(processes)]
    for p in procs:
        p.start()
    try:
        parts = [results.get(timeout=seconds + 300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return combine(parts) | {"processes": processes, "threads": threads, "batch_size": batch_size,
                             "per_process": parts}


def single_image(model: Path, bodies: list[bytes], threads: int, backend: str | None = None) -> dict[str, Any]:
    """One image at a time in this process (the latency a lone request could have)."""
    run, card = _pipeline(model, backend, threads)
    for body in bodies[:8]:
        run([body])
    latencies = []
    for body in bodies:
        t0 = time.perf_counter()
        run([body])
        latencies.append(time.perf_counter() - t0)
    ms = np.asarray(latencies) * 1000
    return {"card": card.name, "images": len(bodies), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "rps": round(len(ms) * 1000 / float(ms.sum()), 2)}
