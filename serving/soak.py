"""Soak: hold a fixed concurrency against the live endpoint for a while; errors, latency, worker memory.

    python -m serving.soak --minutes 10 --concurrency 64      # make soak (MINUTES=...)
    python -m serving.soak --seconds 20                       # the CI-sized version

Cycles through the test images, keeping `concurrency` requests in flight until the time is up,
then waits for the last ones (a bounded loop: it stops by itself). Worker RSS is sampled from
the worker PIDs that the management API lists; growth is measured after a warm-up, so ONNX
Runtime's arena reaching its working size does not count as a leak. Exits 1 on any error or
on RSS growth >= --max-rss-growth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import psutil

from handlers import constants as C
from handlers.torchserve import list_workers
from serving.client import XrayClient
from serving.load import endpoint_level, load_bodies
from serving.settings import ServeSettings, read_keys
from training.sources import default_data_dir


def worker_rss(server: ServeSettings) -> int:
    """Total RSS in bytes of the model's worker processes (0 when none answers)."""
    total = 0
    with contextlib.suppress(OSError, KeyError, ValueError):  # TorchServe restarting: no key, no socket yet
        workers = list_workers(server.socket("management"), read_keys(server.ts_key_file, attempts=3)["management"])
    for w in locals().get("workers", []):
        with contextlib.suppress(psutil.Error, ValueError):
            total += psutil.Process(int(w["pid"])).memory_info().rss
    return total


async def soak(url: str, server: ServeSettings, bodies: list[bytes], seconds: float, concurrency: int,
               warmup: float, key_file: Path | None = None) -> dict:
    """bench's load loop for `seconds`, with the workers' RSS sampled every second beside it
    (through the management socket of the server whose state dir `server` names)."""
    rss: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    async def sampler() -> None:
        while time.perf_counter() < t0 + seconds:
            rss.append((time.perf_counter() - t0, await asyncio.to_thread(worker_rss, server)))
            await asyncio.sleep(1.0)

    async with XrayClient(url, key_file=key_file, concurrency=concurrency, retries=0) as client:
        _, load = await asyncio.gather(sampler(), endpoint_level(client, bodies, sys.maxsize, seconds))
    after_warmup = [v for t, v in rss if t >= warmup] or [v for _, v in rss]
    growth = (after_warmup[-1] - after_warmup[0]) / after_warmup[0] if after_warmup and after_warmup[0] else 0.0
    return {"url": url, **load, "rss_mb_after_warmup": [round(after_warmup[0] / 2**20, 1),
            round(after_warmup[-1] / 2**20, 1)] if after_warmup else None,
            "rss_growth": round(growth, 4), "warmup_s": warmup}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=C.INFERENCE_URL)
    p.add_argument("--state-dir", type=Path, default=None, help="the server's state dir (default .serve): "
                   "worker RSS through its management socket")
    p.add_argument("--minutes", type=float)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=float, help="seconds before RSS counts (default: 20%% of the run, <= 60)")
    p.add_argument("--max-rss-growth", type=float, default=0.10)
    p.add_argument("--images", type=int, default=64, help="distinct test images cycled through")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--key-file", type=Path)
    p.add_argument("--out", type=Path, default=C.REPORTS_DIR / "soak.json")
    ns = p.parse_args(argv)
    seconds = ns.minutes * 60 if ns.minutes else ns.seconds
    warmup = ns.warmup if ns.warmup is not None else min(60.0, 0.2 * seconds)
    server = ServeSettings(**({"state_dir": ns.state_dir} if ns.state_dir else {})).resolved()
    bodies = load_bodies(ns.data_dir or default_data_dir(), ns.images)
    report = asyncio.run(soak(ns.url, server, bodies, seconds, ns.concurrency, warmup, ns.key_file))
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if report["errors"] or report["rss_growth"] >= ns.max_rss_growth:
        print(f"error: {report['errors']} errors, worker RSS growth {report['rss_growth']:.1%} "
              f"(limit {ns.max_rss_growth:.0%})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
