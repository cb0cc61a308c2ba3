"""make bench: the in-process pipeline limit vs the live endpoint at several concurrency levels.

    python -m serving.bench [--url INFERENCE_URL] [--metrics-url METRICS_URL] [--start]
                            [--load wrk|httpx] [--seconds 10] [--concurrency 1,8,32,64]
                            [--model xraynet.onnx | --mar model_store/xray.mar] [--out reports]

(a) In process: decode + handlers.preprocess + ONNX Runtime (handlers.backends.load_runner) on the
    same image bytes: single-image latency, and throughput in batches of the server's batch size.
(b) Live endpoint (`make serve` running, or --start to start and stop one): per concurrency level
    --seconds of load from wrk (C; the async Python client with --load httpx needs a core of its
    own at 64 connections and then measures itself): requests/s, p50/p99 latency, errors, and the
    mean batch size the handler saw (delta XrayRequests / delta XrayBatches on the metrics port).

Writes OUT/bench.json and OUT/bench.md with the ratios best endpoint throughput / in-process
limit (target >= 0.7) and p50 at concurrency 1 / in-process latency (target <= 1.5x + 5 ms).
Numbers depend on the machine and its load; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from handlers import constants as C
from handlers.backends import load_runner, pneumonia_probability
from handlers.preprocess import preprocess
from handlers.torchserve import read_manifest, read_model_config
from serving import launcher
from serving.client import XrayClient, XrayError
from serving.load import endpoint_level, load_bodies, metric_sum, percentiles_ms, wrk_level
from serving.settings import ServeSettings
from training.sources import default_data_dir

DEFAULT_ONNX = C.EXPORT_DIR / f"{C.DEFAULT_FAMILY}{C.MODEL_SUFFIX['onnxruntime']}"
DEFAULT_MAR = C.MODEL_STORE / C.MAR_NAME
THROUGHPUT_TARGET = 0.7
LATENCY_FACTOR, LATENCY_SLACK_MS = 1.5, 5.0


def model_from_mar(mar: Path, into: Path) -> tuple[Path, int | None]:
    """The serialized model (extracted into `into`) and batchSize of a .mar."""
    name = read_manifest(mar)["model"]["serializedFile"]
    with zipfile.ZipFile(mar) as z:
        z.extract(name, into)
    return into / name, read_model_config(mar).get("batchSize")


def in_process(model: Path, bodies: list[bytes], batch_size: int, passes: int = 3) -> dict[str, Any]:
    runner = load_runner(model)
    card = runner.card

    def run(chunk: list[bytes]) -> np.ndarray:
        x = np.stack([preprocess(b, card.input_size, card.mean, card.std) for b in chunk])
        return pneumonia_probability(runner(x), card.head)

    for i in range(0, len(bodies), batch_size):  # warm-up: a full pass
        run(bodies[i : i + batch_size])
    single = []
    for body in bodies * passes:
        t0 = time.perf_counter()
        run([body])
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(bodies), batch_size):
            run(bodies[i : i + batch_size])
    batched_s = time.perf_counter() - t0
    return {"model": str(model), "card": card.name, "batch_size": batch_size, "images": len(bodies) * passes,
            "single_p50_ms": percentiles_ms(single)["p50"], "single_p99_ms": percentiles_ms(single)["p99"],
            "single_rps": round(len(single) / sum(single), 2),
            "throughput_rps": round(len(bodies) * passes / batched_s, 2)}


def endpoint(args: argparse.Namespace, bodies: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for c in args.concurrency:
        batches0, requests0 = metric_sum(args.metrics_url, "XrayBatches"), metric_sum(args.metrics_url, "XrayRequests")

        async def run(c: int = c) -> dict[str, Any]:
            # No retries: a 503 is an error to count here, not to hide.
            async with XrayClient(args.url, args.token, args.key_file, concurrency=c, retries=0) as client:
                if not rows:
                    await client.predict(bodies[0])  # warm-up, and fail fast when unreachable
                if args.load == "wrk":
                    return await asyncio.to_thread(wrk_level, client.url, client.token, bodies, c, args.seconds)
                return await endpoint_level(client, bodies, args.requests, args.seconds) | {"load": "httpx"}

        row = asyncio.run(run())
        batches1, requests1 = metric_sum(args.metrics_url, "XrayBatches"), metric_sum(args.metrics_url, "XrayRequests")
        if None in (batches0, batches1, requests0, requests1) or batches1 == batches0:
            row["mean_batch"] = None
        else:
            row["mean_batch"] = round((requests1 - requests0) / (batches1 - batches0), 2)
        print(f"concurrency {c}: {row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, "
              f"errors {row['errors']}, mean batch {row['mean_batch']}", flush=True)
        rows.append(row)
    return rows


def summarize(local: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(rows, key=lambda r: r["throughput_rps"])
    c1 = next((r for r in rows if r["concurrency"] == 1), None)
    budget = LATENCY_FACTOR * local["single_p50_ms"] + LATENCY_SLACK_MS
    out = {"throughput_ratio": round(best["throughput_rps"] / local["throughput_rps"], 3),
           "throughput_target": THROUGHPUT_TARGET, "best_concurrency": best["concurrency"]}
    out["throughput_ok"] = out["throughput_ratio"] >= THROUGHPUT_TARGET
    if c1:
        out |= {"latency_c1_p50_ms": c1["p50_ms"], "latency_budget_ms": round(budget, 2),
                "latency_ratio": round(c1["p50_ms"] / local["single_p50_ms"], 3),
                "latency_ok": c1["p50_ms"] <= budget}
    return out


def markdown(result: dict[str, Any]) -> str:
    local, s = result["in_process"], result["summary"]
    lines = ["# Bench: in-process limit vs live endpoint", "",
             f"{result['url']}; {result['distinct_images']} distinct test images cycled; model {local['card']} "
             f"({Path(local['model']).name}); {result['when']}", "",
             "| run | concurrency | requests | errors | req/s | p50 ms | p99 ms | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| in-process single image | 1 | {local['images']} | 0 | {local['single_rps']} | "
             f"{local['single_p50_ms']} | {local['single_p99_ms']} | 1 |",
             f"| in-process batched | - | {local['images']} | 0 | {local['throughput_rps']} | - | - | "
             f"{local['batch_size']} (limit) |"]
    for r in result["endpoint"]:
        lines.append(f"| endpoint | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch'] if r['mean_batch'] is not None else '-'} |")
    lines += ["", f"- best endpoint throughput / in-process limit: **{s['throughput_ratio']}** "
              f"(concurrency {s['best_concurrency']}; target >= {THROUGHPUT_TARGET}: "
              f"{'met' if s['throughput_ok'] else 'NOT met'})"]
    if "latency_ok" in s:
        lines.append(f"- p50 at concurrency 1: **{s['latency_c1_p50_ms']} ms** = {s['latency_ratio']}x the in-process "
                     f"{local['single_p50_ms']} ms (target <= {LATENCY_FACTOR}x + {LATENCY_SLACK_MS:g} ms = "
                     f"{s['latency_budget_ms']} ms: {'met' if s['latency_ok'] else 'NOT met'})")
    loads = sorted({r.get("load", "httpx") for r in result["endpoint"]})
    lines += ["", f"Load generator: {', '.join(loads)}. Client, server and in-process runs share this machine's CPU "
              "cores; other jobs on the host change the numbers.", ""]
    return "\n".join(lines)


def resolve_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, int]:
    if args.model:
        return args.model, args.batch_size or 8
    if args.mar.is_file():
        model, batch = model_from_mar(args.mar, tmp)
        return model, args.batch_size or batch or 8
    if DEFAULT_ONNX.is_file():
        return DEFAULT_ONNX, args.batch_size or 8
    raise FileNotFoundError(f"neither {args.mar} nor {DEFAULT_ONNX}: run `make export archive` or pass --model")


def bench(args: argparse.Namespace) -> dict[str, Any]:
    bodies = load_bodies(args.data_dir, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        model, batch_size = resolve_model(args, Path(tmp))
        print(f"in-process: {model.name}, batch {batch_size}, {len(bodies)} images", flush=True)
        local = in_process(model, bodies, batch_size)
    print(f"in-process: single p50 {local['single_p50_ms']} ms, batched {local['throughput_rps']} img/s", flush=True)
    rows = endpoint(args, bodies)
    result = {"url": args.url, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "distinct_images": len(bodies),
              "in_process": local, "endpoint": rows}
    result["summary"] = summarize(local, rows)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=C.INFERENCE_URL)
    p.add_argument("--metrics-url", default=C.METRICS_URL)
    p.add_argument("--start", action="store_true", help="start TorchServe (default settings) and stop it after")
    p.add_argument("--load", choices=["wrk", "httpx"], default="wrk" if shutil.which("wrk") else "httpx",
                   help="load generator: wrk (default where installed) or the project's async httpx client")
    p.add_argument("--requests", type=int, default=400, help="httpx load: at most this many requests per level")
    p.add_argument("--seconds", type=float, default=10, help="seconds per concurrency level (at most, for httpx)")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--images", type=int, default=64, help="distinct test images to cycle through")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--model", type=Path, help="exported model for the in-process run")
    p.add_argument("--mar", type=Path, default=DEFAULT_MAR, help="take the model and batch size from this archive")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--token")
    p.add_argument("--key-file", type=Path)
    p.add_argument("--out", type=Path, default=C.REPORTS_DIR, help="folder for bench.json and bench.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = ServeSettings().resolved()
    if args.start:
        args.url, args.metrics_url, args.key_file = settings.inference_url, settings.metrics_url, settings.key_file
        try:
            launcher.start(settings)
        except launcher.LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        result = bench(args)
    except (XrayError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.start:
            launcher.stop(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "bench.md").write_text(md)
    print(md)
    print(f"wrote {args.out}/bench.json and bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
