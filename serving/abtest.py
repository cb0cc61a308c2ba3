"""A/B of a serving lever: two servers side by side, loaded in alternating slices, CPU per request by role.

    python -m serving.abtest --b routine_logs=false [--a KEY=VALUE ...] [--store-b DIR] \\
        [--slices 4] [--slice-seconds 5] [--warmup 15] [--concurrency 32] [--port-base 18200] \\
        [--json reports/ab_routine_logs.json]

Side A and side B are two gateway + TorchServe servers (serving.launcher) that differ only in what
--a/--b set (ServeSettings fields) and in their model stores (--store-a/--store-b: e.g. two archives
whose handlers differ). After a warm-up of both, wrk loads one server at a time, A and B taking
turns (ABBA order) for --slices rounds, so both see the same background load on a shared host;
each slice measures the server's CPU ms per request by role (serving.proccpu) and the JVM's thread
groups. Reported: the medians per side and B - A. Wall-clock throughput is printed, not compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from handlers import constants as C
from serving import launcher, proccpu
from serving.load import load_bodies, write_json, wrk_level
from serving.settings import PORT_FIELDS, ServeSettings, port_settings, read_keys
from training.sources import default_data_dir

PORTS_PER_SIDE = len(PORT_FIELDS)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs -> ServeSettings overrides (values as JSON where they parse, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def side_settings(root: Path, ports: list[int], store: Path, overrides: dict[str, Any]) -> ServeSettings:
    return ServeSettings(**port_settings(ports), model_store=store, state_dir=root / "state", log_dir=root / "logs",
                         **overrides).resolved()


def slice_cpu(s: ServeSettings, token: str | None, bodies: list[bytes], concurrency: int,
              seconds: float) -> dict[str, Any]:
    """One wrk slice against one server: req/s and its CPU ms per request by role and JVM thread group."""
    root = launcher.server_pid(s)
    before = proccpu.snapshot(root) if root else {}
    java = proccpu.pids_of(before, "frontend")
    threads0 = proccpu.thread_snapshot(java)
    row = wrk_level(f"{s.inference_url}/predictions/{C.MODEL_NAME}", token, bodies, concurrency, seconds)
    spent = proccpu.delta(before, proccpu.snapshot(root) if root else {})
    ok = row["requests"] - row["errors"]
    return {"rps": row["throughput_rps"], "errors": row["errors"], "requests": row["requests"],
            "cpu_ms": proccpu.per_request_ms(spent, ok),
            "threads_ms": proccpu.top_threads(threads0, proccpu.thread_snapshot(java), ok, n=6)}


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    roles = [*proccpu.ROLES, "total"]
    out: dict[str, Any] = {"rps": round(statistics.median(r["rps"] for r in rows), 1),
                           "errors": sum(r["errors"] for r in rows)}
    out["cpu_ms"] = {k: round(statistics.median(r["cpu_ms"][k] or 0.0 for r in rows), 3) for k in roles}
    groups = sorted({g for r in rows for g in r["threads_ms"]})
    out["threads_ms"] = {g: round(statistics.median(r["threads_ms"].get(g, 0.0) for r in rows), 3) for g in groups}
    return out


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each side, B - A per role, and in how many slice pairs B was below A (total CPU)."""
    ma, mb = medians(a), medians(b)
    diff = {k: round(mb["cpu_ms"][k] - ma["cpu_ms"][k], 3) for k in ma["cpu_ms"]}
    lower = sum(1 for x, y in zip(a, b, strict=True) if (y["cpu_ms"]["total"] or 0) < (x["cpu_ms"]["total"] or 0))
    return {"a": ma, "b": mb, "b_minus_a_ms": diff, "b_lower_in": f"{lower} of {len(a)}"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = load_bodies(args.data_dir, args.images)
    base = args.port_base
    with tempfile.TemporaryDirectory(prefix="xray-ab-") as tmp:
        sides = {}
        for k, (name, store, over) in enumerate((("a", args.store_a, args.a), ("b", args.store_b, args.b))):
            ports = [base + k * PORTS_PER_SIDE + i for i in range(PORTS_PER_SIDE)]
            sides[name] = side_settings(Path(tmp) / name, ports, store, parse_assignments(over))
        try:
            for name, s in sides.items():
                launcher.start(s)
                print(f"side {name}: {s.inference_url}, store {s.model_store}, {args.a if name == 'a' else args.b}",
                      flush=True)
            tokens = {name: read_keys(s.key_file)["inference"] for name, s in sides.items()}
            for name, s in sides.items():
                slice_cpu(s, tokens[name], bodies, args.concurrency, args.warmup)
            rows: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
            for i in range(args.slices):
                for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
                    r = slice_cpu(sides[name], tokens[name], bodies, args.concurrency, args.slice_seconds)
                    rows[name].append(r)
                    print(f"slice {i} {name}: {r['rps']} req/s, CPU ms/req {r['cpu_ms']}", flush=True)
        finally:
            for s in sides.values():
                launcher.stop(s)
    result = {"a": args.a, "b": args.b, "store_a": str(args.store_a), "store_b": str(args.store_b),
              "concurrency": args.concurrency, "slices": rows} | compare(rows["a"], rows["b"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="ServeSettings fields of side A")
    p.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="ServeSettings fields of side B")
    p.add_argument("--store-a", type=Path, default=C.MODEL_STORE, help="model store (xray.mar) of side A")
    p.add_argument("--store-b", type=Path, default=C.MODEL_STORE, help="model store (xray.mar) of side B")
    p.add_argument("--slices", type=int, default=4, help="slices per side")
    p.add_argument("--slice-seconds", type=float, default=5)
    p.add_argument("--warmup", type=float, default=15, help="seconds of load on each side first")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--port-base", type=int, default=18200, help=f"side A takes {PORTS_PER_SIDE} ports from "
                   "here, side B the next ones")
    p.add_argument("--json", type=Path, help="write the result here")
    args = p.parse_args(argv)
    result = run(args)
    for side in ("a", "b"):
        m = result[side]
        print(f"{side}: {m['rps']} req/s; CPU ms/req {m['cpu_ms']}; JVM threads {m['threads_ms']}")
    print(f"B - A (ms/req): {result['b_minus_a_ms']}; B lower in {result['b_lower_in']} slice pairs")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
