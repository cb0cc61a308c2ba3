"""make bench: the served endpoint against the machine's honest limit, in one run.

    python -m serving.bench [--quick] [--start] [--port-base N] [--url INFERENCE_URL]
                            [--metrics-url METRICS_URL] [--state-dir .serve] [--seconds 10]
                            [--concurrency 1,8,32,64] [--rates 0.25,0.5,...] [--profile-seconds 10]
                            [--mar model_store/xray.mar] [--out reports]

1. The honest limit (serving.limit): the handler's own pipeline (handlers.preprocess, the
   handlers.backends runner, batches of the archive's batch size) in one process per server
   worker with the worker's thread count, side by side: images/s and CPU ms per image.
2. Closed loop: wrk (C) at each concurrency (the async httpx client where wrk is missing):
   req/s, p50/p99, errors, mean batch (the XrayBatchSize histogram: _sum / _count).
3. Open loop (serving.openloop): fixed arrival rates, latency from the scheduled send time;
   goodput = the highest rate with p99 <= 50 ms and no errors. Rates are fractions of the best
   closed-loop throughput unless --rates-rps gives them.
4. CPU per request of the server's processes, by role (serving.proccpu: gateway, Java
   frontend, Python workers, found from the launcher's pid file and its children), against the
   in-process CPU ms per image: a ratio that holds on a shared, noisy machine.
5. Profile (serving.profile), after everything measured: py-spy over the Python workers and the
   JVM's flight recorder over the frontend, during one more closed-loop level: where each role's
   time goes, by stage, beside its CPU per request.

Writes OUT/bench.json and OUT/bench.md. Numbers depend on the machine and its load; nothing
here is asserted (targets are reported as met or not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from handlers import constants as C
from handlers.torchserve import read_manifest, read_model_config
from serving import launcher, limit, openloop, proccpu
from serving import profile as prof
from serving.client import XrayClient, XrayError
from serving.load import batch_counts, endpoint_level, load_bodies, wrk_level
from serving.settings import PORT_FIELDS, ServeSettings, port_settings, token
from training.sources import default_data_dir

DEFAULT_ONNX = C.EXPORT_DIR / f"{C.DEFAULT_FAMILY}{C.MODEL_SUFFIX['onnxruntime']}"
DEFAULT_MAR = C.MODEL_STORE / C.MAR_NAME
THROUGHPUT_TARGET = 0.8  # best served req/s / the honest limit's img/s
CPU_TARGET = 1.25  # server CPU ms per request / in-process CPU ms per image
LATENCY_FACTOR, LATENCY_SLACK_MS = 1.5, 5.0
P99_TARGET_MS = openloop.P99_TARGET_MS
DEFAULT_RATES = (0.25, 0.5, 0.65, 0.8, 0.9, 1.0, 1.1)  # x the best closed-loop req/s
QUICK = {"seconds": 3.0, "limit_seconds": 3.0, "concurrency": [1, 32], "images": 32,
         "rates": [0.5, 0.8, 1.0], "warmup": 3.0, "profile_seconds": 4.0}
PROFILE_CONCURRENCY = 32


def model_from_mar(mar: Path, into: Path) -> tuple[Path, int | None]:
    """The serialized model (extracted into `into`) and batchSize of a .mar."""
    name = read_manifest(mar)["model"]["serializedFile"]
    with zipfile.ZipFile(mar) as z:
        z.extract(name, into)
    return into / name, read_model_config(mar).get("batchSize")


def cpu_probe(root_pid: int | None) -> Callable[[], Callable[[int], dict[str, Any]]]:
    """start() -> stop(requests): the server's CPU ms per request by role over what ran between."""
    def start() -> Callable[[int], dict[str, Any]]:
        before = proccpu.snapshot(root_pid) if root_pid else {}
        java = proccpu.pids_of(before, "frontend")
        threads0 = proccpu.thread_snapshot(java)
        t0 = time.perf_counter()

        def stop(requests: int) -> dict[str, Any]:
            if not root_pid:
                return {}
            threads1 = proccpu.thread_snapshot(java)
            after = proccpu.snapshot(root_pid)
            spent = proccpu.delta(before, after)
            wall = time.perf_counter() - t0
            # Where the frontend's CPU goes, by JVM thread pool (netty, worker I/O, JIT, GC). The JIT
            # compiler's share is warm-up: it shrinks the longer the JVM runs.
            threads = proccpu.top_threads(threads0, threads1, requests, n=1000)
            jit = sum(v for k, v in threads.items() if "CompilerThre" in k)
            return {"server_cpu_ms": proccpu.per_request_ms(spent, requests),
                    "server_cores_busy": round(sum(spent.values()) / wall, 2) if wall else None,
                    "frontend_jit_ms": round(jit, 3),
                    "frontend_threads_ms": dict(list(threads.items())[:8])}
        return stop
    return start


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def closed_loop(args: argparse.Namespace, bodies: list[bytes], probe: Callable) -> list[dict[str, Any]]:
    rows = []
    for c in args.concurrency:
        batches0, requests0 = batch_counts(args.metrics_url)

        async def run(c: int = c) -> dict[str, Any]:
            # No retries: a 503 is an error to count here, not to hide.
            async with XrayClient(args.url, args.token, args.key_file, concurrency=c, retries=0) as client:
                if args.load == "wrk":
                    return await asyncio.to_thread(wrk_level, client.url, client.token, bodies, c, args.seconds)
                return await endpoint_level(client, bodies, args.requests, args.seconds) | {"load": "httpx"}

        stop = probe()
        gen0, cpu0 = children_cpu_s(), time.process_time()
        row = asyncio.run(run())
        gen_s = children_cpu_s() - gen0 if args.load == "wrk" else time.process_time() - cpu0
        row |= stop(row["requests"])
        row["generator_cpu_ms_per_request"] = round(gen_s * 1000 / row["requests"], 4) if row["requests"] else None
        batches1, requests1 = batch_counts(args.metrics_url)
        if None in (batches0, batches1, requests0, requests1) or batches1 == batches0:
            row["mean_batch"] = None
        else:
            row["mean_batch"] = round((requests1 - requests0) / (batches1 - batches0), 2)
        cpu = row.get("server_cpu_ms", {})
        print(f"closed loop, concurrency {c}: {row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, "
              f"p99 {row['p99_ms']} ms, errors {row['errors']}, mean batch {row['mean_batch']}, "
              f"server CPU {cpu.get('total')} ms/req", flush=True)
        rows.append(row)
    return rows


def open_loop(args: argparse.Namespace, bodies: list[bytes], best_rps: float, probe: Callable) -> list[dict[str, Any]]:
    rates = args.rates_rps or [round(f * best_rps, 1) for f in args.rates]
    tok = args.token or token("inference", args.key_file)
    requests = [openloop.request_bytes(args.url, f"/predictions/{C.MODEL_NAME}", b, tok) for b in bodies]

    def on_level(rate: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
        stop = probe()

        def done(row: dict[str, Any]) -> dict[str, Any]:
            extra = stop(row["sent"])
            cpu = extra.get("server_cpu_ms", {})
            print(f"open loop, {rate:g} req/s: {row['throughput_rps']} answered/s, p50 {row['p50_ms']} ms, "
                  f"p99 {row['p99_ms']} ms, errors {row['errors']}, server CPU {cpu.get('total')} ms/req, "
                  f"generator {row['generator_cpu_share']} of a core (late p99 {row['send_late_p99_ms']} ms)",
                  flush=True)
            return extra
        return done

    return openloop.sweep(args.url, requests, sorted(rates), args.seconds, on_level=on_level)


def profile_level(args: argparse.Namespace, bodies: list[bytes], root_pid: int | None) -> dict[str, Any]:
    """One more wrk level while py-spy samples the workers and JFR the frontend (serving.profile)."""
    if not args.profile_seconds or not root_pid:
        return {}
    snap = proccpu.snapshot(root_pid)
    workers, java = proccpu.pids_of(snap, "workers"), proccpu.pids_of(snap, "frontend")
    tok = args.token or token("inference", args.key_file)
    url = f"{args.url.rstrip('/')}/predictions/{C.MODEL_NAME}"
    seconds = args.profile_seconds
    stop = cpu_probe(root_pid)()
    with ThreadPoolExecutor(3) as pool:
        # wrk starts first and runs a second longer on each side than the recorders.
        load = pool.submit(wrk_level, url, tok, bodies, PROFILE_CONCURRENCY, seconds + 2)
        time.sleep(1)
        workers_f = pool.submit(prof.py_spy, workers, seconds)
        frontend_f = pool.submit(prof.jfr, java[0] if java else None, seconds)
        row = load.result()
        result = {"workers": workers_f.result(), "frontend": frontend_f.result()}
    cpu = stop(row["requests"] - row["errors"])
    print(f"profile: {row['throughput_rps']} req/s; workers by stage {result['workers'].get('stages')}; "
          f"frontend by part {result['frontend'].get('stages')}", flush=True)
    return result | {"seconds": seconds, "concurrency": PROFILE_CONCURRENCY, "rps": row["throughput_rps"],
                     "server_cpu_ms": cpu.get("server_cpu_ms"), "frontend_threads_ms": cpu.get("frontend_threads_ms")}


def summarize(lim: dict[str, Any], single: dict[str, Any], closed: list[dict[str, Any]],
              opened: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline figures and ratios (pure: the tests check it on hand-made rows)."""
    best = max(closed, key=lambda r: r["throughput_rps"]) if closed else None
    good = openloop.goodput(opened)
    out: dict[str, Any] = {"limit_rps": lim["throughput_rps"], "limit_cpu_ms_per_image": lim["cpu_ms_per_image"],
                           "throughput_target": THROUGHPUT_TARGET, "cpu_target": CPU_TARGET,
                           "goodput_rps": good, "p99_target_ms": P99_TARGET_MS}
    if good is not None and lim["throughput_rps"]:
        out["goodput_ratio"] = round(good / lim["throughput_rps"], 3)
    if best:
        out |= {"best_rps": best["throughput_rps"], "best_concurrency": best["concurrency"],
                "throughput_ratio": round(best["throughput_rps"] / lim["throughput_rps"], 3)}
        out["throughput_ok"] = out["throughput_ratio"] >= THROUGHPUT_TARGET
        cpu = best.get("server_cpu_ms") or {}
        if cpu.get("total") is not None and lim["cpu_ms_per_image"]:
            out["server_cpu_ms"] = cpu
            out["cpu_ratio"] = round(cpu["total"] / lim["cpu_ms_per_image"], 3)
            out["cpu_ratio_by_role"] = {k: round(v / lim["cpu_ms_per_image"], 3) for k, v in cpu.items()
                                        if v is not None and k != "total"}
            out["cpu_ok"] = out["cpu_ratio"] <= CPU_TARGET
            jit = best.get("frontend_jit_ms") or 0.0
            out["cpu_ratio_without_jit"] = round((cpu["total"] - jit) / lim["cpu_ms_per_image"], 3)
    c1 = next((r for r in closed if r["concurrency"] == 1), None)
    if c1 and single:
        budget = LATENCY_FACTOR * single["p50_ms"] + LATENCY_SLACK_MS
        out |= {"latency_c1_p50_ms": c1["p50_ms"], "latency_budget_ms": round(budget, 2),
                "latency_ok": c1["p50_ms"] <= budget}
    return out


def _f(v: Any) -> str:
    return "-" if v is None else str(v)


def markdown(result: dict[str, Any]) -> str:
    lim, single, s = result["limit"], result["single_image"], result["summary"]
    lines = ["# Bench: the endpoint against the honest in-process limit", "",
             f"{result['url']}; model {single['card']} ({Path(result['model']).name}), batch {lim['batch_size']}, "
             f"{lim['processes']} worker(s) x {lim['threads']} thread(s); {result['distinct_images']} distinct test "
             f"images cycled; {result['when']}; load average at start {result['loadavg']}; `{result['command']}`", "",
             "## Summary", "",
             "| figure | value | target |", "|---|---:|---|",
             f"| honest limit (in-process, {lim['processes']} x {lim['threads']} thread; mean of a run before "
             "and one after the endpoint) | "
             f"{lim['throughput_rps']} img/s, {lim['cpu_ms_per_image']} CPU ms/img (runs: "
             + ", ".join(f"{r['throughput_rps']} img/s and {r['cpu_ms_per_image']} ms" for r in lim.get("runs", []))
             + ") | |",
             f"| best closed-loop throughput | {_f(s.get('best_rps'))} req/s (concurrency "
             f"{_f(s.get('best_concurrency'))}) = **{_f(s.get('throughput_ratio'))}x** the limit | >= "
             f"{THROUGHPUT_TARGET}x: {'met' if s.get('throughput_ok') else 'NOT met'} |",
             f"| goodput (open loop, p99 <= {P99_TARGET_MS:g} ms, no errors) | {_f(s.get('goodput_rps'))} req/s "
             f"= {_f(s.get('goodput_ratio'))}x the limit | |"]
    if "cpu_ratio" in s:
        c = s["server_cpu_ms"]
        lines.append(f"| server CPU per request (at the best level) | {c['total']} ms = **{s['cpu_ratio']}x** the "
                     f"in-process {lim['cpu_ms_per_image']} ms/img | <= {CPU_TARGET}x: "
                     f"{'met' if s['cpu_ok'] else 'NOT met'}; {s['cpu_ratio_without_jit']}x without the JVM's "
                     "JIT compiler threads (warm-up) |")
        lines.append("| ... by role (ms/req; x in-process) | " + ", ".join(
            f"{k} {c[k]} ({s['cpu_ratio_by_role'][k]}x)" for k in proccpu.ROLES if c.get(k)) + " | |")
    best = next((r for r in result["closed_loop"] if r["concurrency"] == s.get("best_concurrency")), None)
    if best and best.get("frontend_threads_ms"):
        lines.append("| ... frontend by JVM thread group (ms/req) | " + ", ".join(
            f"{k} {v}" for k, v in best["frontend_threads_ms"].items()) + " | |")
    if "latency_ok" in s:
        lines.append(f"| p50 at concurrency 1 | {s['latency_c1_p50_ms']} ms (in-process single image "
                     f"{single['p50_ms']} ms) | <= {s['latency_budget_ms']} ms: "
                     f"{'met' if s['latency_ok'] else 'NOT met'} |")
    lines += ["", "## Closed loop (" + ", ".join(sorted({r.get("load", "httpx") for r in result["closed_loop"]}))
              + f", {result['seconds']:g} s a level)", "",
              "| concurrency | requests | errors | req/s | p50 ms | p99 ms | mean batch | server CPU ms/req: "
              "gateway / frontend / workers / total | load generator CPU ms/req |",
              "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["closed_loop"]:
        c = r.get("server_cpu_ms") or {}
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput_rps']} | {r['p50_ms']} "
                     f"| {r['p99_ms']} | {_f(r['mean_batch'])} | {_f(c.get('gateway'))} / {_f(c.get('frontend'))} / "
                     f"{_f(c.get('workers'))} / {_f(c.get('total'))} | {_f(r.get('generator_cpu_ms_per_request'))} |")
    lines += ["", "## Open loop (fixed arrival rates, latency from the scheduled send, "
              f"{result['seconds']:g} s a rate)",
              "", "| rate req/s | sent | answered/s | errors | p50 ms | p90 ms | p99 ms | connections | "
              "server CPU ms/req | generator: CPU ms/req, share of a core, late p99 ms | meets target |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["open_loop"]:
        c = r.get("server_cpu_ms") or {}
        lines.append(f"| {r['rate']} | {r['sent']} | {r['throughput_rps']} | {r['errors']} | {r['p50_ms']} | "
                     f"{r['p90_ms']} | {r['p99_ms']} | {r['connections']} | {_f(c.get('total'))} | "
                     f"{r['generator_cpu_ms_per_request']}, {r['generator_cpu_share']}, {r['send_late_p99_ms']} | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    late = max((r["send_late_p99_ms"] or 0 for r in result["open_loop"]), default=0)
    if late > 5:
        lines += ["", f"The open-loop generator woke up to {late} ms late (p99) for its sends: the host was busy. "
                  "Latencies still count from the scheduled times, so lateness shows as latency, never hides it."]
    if result.get("profile"):
        lines += ["", *prof.markdown(result["profile"])]
    lines += ["", f"Server processes found from the launcher's pid file: {result['server_processes']}. CPU is user + "
              "system time from /proc over each level, divided by the requests of that level; the in-process "
              "limit's CPU comes from its processes' own clocks. Client, server and limit share this machine's "
              "cores; wall-clock figures move with other jobs on the host, CPU per request much less.", ""]
    return "\n".join(lines)


def resolve_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The model file and the archive's model-config.yaml (batch size, workers, handler threads)."""
    if args.model:
        return args.model, {}
    if args.mar.is_file():
        model, _ = model_from_mar(args.mar, tmp)
        return model, read_model_config(args.mar)
    if DEFAULT_ONNX.is_file():
        return DEFAULT_ONNX, {}
    raise FileNotFoundError(f"neither {args.mar} nor {DEFAULT_ONNX}: run `make export archive` or pass --model")


def warm_up(args: argparse.Namespace, bodies: list[bytes]) -> None:
    """A few seconds of load first: the JVM's JIT and the workers' arenas settle before anything counts."""
    async def run() -> None:
        async with XrayClient(args.url, args.token, args.key_file, concurrency=8, retries=0) as client:
            await client.predict(bodies[0])  # fails fast when the endpoint is unreachable
            if args.load == "wrk":
                await asyncio.to_thread(wrk_level, client.url, client.token, bodies, 32, args.warmup)
            else:
                await endpoint_level(client, bodies, 10_000, args.warmup)
    asyncio.run(run())


def bench(args: argparse.Namespace) -> dict[str, Any]:
    bodies = load_bodies(args.data_dir, args.images)
    root_pid = args.pid or launcher.server_pid(args.settings)
    found = proccpu.counts(proccpu.snapshot(root_pid)) if root_pid else {}
    if not root_pid:
        print("warning: no server pid found under the state dir: server CPU is not measured", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model, config = resolve_model(args, Path(tmp))
        batch = args.batch_size or config.get("batchSize") or C.BATCH_SIZE
        workers = args.workers or found.get("workers") or config.get("minWorkers") or C.WORKERS
        threads = args.threads if args.threads is not None else (config.get("handler") or {}).get(
            "threads", C.WORKER_THREADS)

        def measure_limit(when: str) -> dict[str, Any]:
            print(f"limit ({when}): {model.name}, {workers} process(es) x {threads} thread(s), batch {batch}, "
                  f"{args.limit_seconds:g} s", flush=True)
            lim = limit.parallel_limit(model, bodies, batch, workers, threads, args.limit_seconds)
            print(f"limit ({when}): {lim['throughput_rps']} img/s, {lim['cpu_ms_per_image']} CPU ms/img", flush=True)
            return lim

        first = measure_limit("before the endpoint")
        single = limit.single_image(model, bodies, threads)
        print(f"single image p50 {single['p50_ms']} ms", flush=True)
        warm_up(args, bodies)
        probe = cpu_probe(root_pid)
        closed = closed_loop(args, bodies, probe)
        best = max((r["throughput_rps"] for r in closed), default=first["throughput_rps"])
        opened = open_loop(args, bodies, best, probe) if args.rates or args.rates_rps else []
        # Measured again after the endpoint, so that a change in the host's load between the two
        # shows (both runs are reported) and the ratios use their mean.
        lim = limit.average([first, measure_limit("after the endpoint")])
    profile = profile_level(args, bodies, root_pid)
    result = {"url": args.url, "model": str(model), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python -m serving.bench " + " ".join(args.argv),
              "loadavg": [round(x, 2) for x in os.getloadavg()],
              "distinct_images": len(bodies), "seconds": args.seconds, "server_processes": found,
              "limit": lim, "single_image": single, "closed_loop": closed, "open_loop": opened,
              "profile": profile}
    result["summary"] = summarize(lim, single, closed, opened)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run: " + json.dumps(QUICK))
    p.add_argument("--url", help="inference URL (default: the launcher's settings)")
    p.add_argument("--metrics-url", help="metrics URL (default: the launcher's settings)")
    p.add_argument("--state-dir", type=Path, help="the launcher's state dir (pid file, key file); default .serve")
    p.add_argument("--pid", type=int, help="root pid of the server's process tree (default: the launcher's pid file)")
    p.add_argument("--start", action="store_true", help="start the server (default settings) and stop it after")
    p.add_argument("--port-base", type=int, help="the server's ports: inference N, metrics N+1, gRPC N+2 and "
                   "N+3, worker sockets N+4 (default: the launcher's defaults)")
    p.add_argument("--profile-seconds", type=float, default=10, help="seconds of py-spy + JFR at the end (0: none)")
    p.add_argument("--load", choices=["wrk", "httpx"], default="wrk" if shutil.which("wrk") else "httpx",
                   help="closed-loop generator: wrk (default where installed) or the project's async httpx client")
    p.add_argument("--requests", type=int, default=100_000, help="httpx load: at most this many requests per level")
    p.add_argument("--seconds", type=float, default=10, help="seconds per closed-loop level and per open-loop rate")
    p.add_argument("--limit-seconds", type=float, default=10, help="seconds of the in-process limit")
    p.add_argument("--warmup", type=float, default=15, help="seconds of load before anything counts")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--rates", type=lambda s: [float(c) for c in s.split(",") if c], default=list(DEFAULT_RATES),
                   help="open-loop rates as fractions of the best closed-loop req/s ('' = no open loop)")
    p.add_argument("--rates-rps", type=lambda s: [float(c) for c in s.split(",")], help="open-loop rates in req/s")
    p.add_argument("--images", type=int, default=64, help="distinct test images to cycle through")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--model", type=Path, help="exported model for the in-process limit")
    p.add_argument("--mar", type=Path, default=DEFAULT_MAR, help="take the model, batch size, workers and threads "
                   "from this archive")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="limit processes (default: the server's worker processes)")
    p.add_argument("--threads", type=int, help="threads per limit process (default: the archive's)")
    p.add_argument("--token")
    p.add_argument("--key-file", type=Path)
    p.add_argument("--out", type=Path, default=C.REPORTS_DIR, help="folder for bench.json and bench.md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in args.argv if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    given: dict[str, Any] = {"state_dir": args.state_dir} if args.state_dir else {}
    if args.port_base:
        given |= port_settings(range(args.port_base, args.port_base + len(PORT_FIELDS)))
    settings = ServeSettings(**given).resolved()
    args.settings = settings
    args.url = args.url or settings.inference_url
    args.metrics_url = args.metrics_url or settings.metrics_url
    args.key_file = args.key_file or settings.key_file
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = args.settings
    if args.start:
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
