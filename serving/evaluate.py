"""make evaluate: every image of a split through the live endpoint -> clinical metrics and latency.

    python -m serving.evaluate [--url INFERENCE_URL] [--data-dir D] [--split test]
                               [--concurrency 16] [--limit N] [--min-accuracy A]
                               [--expect artifacts/export/predictions_xraynet.json] [--tolerance 1e-5]
                               [--out-dir reports/evaluate]

D is an ImageFolder tree (SPLIT/{NORMAL,PNEUMONIA}/*.jpeg), a labelled folder ({NORMAL,PNEUMONIA}/*,
no split level), or a folder with the course's x_test_normal.npy / x_test_pneumonia.npy (or
test_normal.npy / ...): each array is sent as a .npy body. Metrics are computed on the SERVED
probabilities at the SERVED threshold. The report (serving.evaluation, shared with
`python -m serving.offline evaluate`) goes to OUT/evaluate.json, evaluate.md, roc.png, confusion.png.

Exit status: 0 ok; 1 when an image is unanswered, accuracy < --min-accuracy or a served
probability differs from --expect; 2 when the server is unreachable or the input is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from handlers import constants as C
from serving import trust_report
from serving.client import Result, XrayClient, XrayHTTPError, XrayUnavailable
from serving.evaluation import DEFAULT_OUT, EvaluateError, build_report, conclude
from serving.load import Item, list_items, stratified
from training.sources import default_data_dir


async def collect(client: XrayClient, items: list[Item], url: str) -> tuple[dict[str, Result], float]:
    """Send every item once; the first alone, so an unreachable server fails before the rest is sent."""
    t0 = time.perf_counter()
    first = (await client.predict_many([items[0][:2]], progress=False))[0]
    if not first.ok:
        err = first.error
        if isinstance(err, XrayHTTPError) and err.token_refused:
            raise EvaluateError(f"{url} refused the token ({err}); pass --token/--key-file or set XRAY_KEY_FILE", 2)
        if isinstance(err, XrayUnavailable):
            raise EvaluateError(f"server unreachable: {err}", 2)
    rest = await client.predict_many([it[:2] for it in items[1:]], desc="evaluate")
    results: dict[str, Result] = {}
    for result in [first, *rest]:  # one entry per file name: retries live inside a Result
        if result.name in results:
            raise EvaluateError(f"{result.name} answered twice", 1)
        results[result.name] = result
    return results, time.perf_counter() - t0


def evaluate(args: argparse.Namespace) -> int:
    try:
        items = stratified(list_items(args.data_dir, args.split), args.limit)
    except FileNotFoundError as exc:
        raise EvaluateError(str(exc), 2) from None

    async def run() -> tuple[dict[str, Result], float, dict[str, float]]:
        async with XrayClient(args.url, args.token, args.key_file, concurrency=args.concurrency,
                              timeout=args.timeout, retries=args.retries) as client:
            results, wall_s = await collect(client, items, args.url)
            # Each operating point's threshold as the server applies it: one answered image, once per point.
            body = next((b for name, b, _ in items if results[name].ok), None)
            if body is None:
                return results, wall_s, {}
            data = body.read_bytes() if isinstance(body, Path) else body
            return results, wall_s, await trust_report.point_thresholds(client, data)

    results, wall_s, points = asyncio.run(run())
    if not any(r.ok for r in results.values()):
        raise EvaluateError(f"no image was answered; first error: {next(iter(results.values())).error}", 1)
    report = build_report(items, results, wall_s, {"mode": "live", "url": args.url, "data_dir": args.data_dir,
                                                   "split": args.split, "concurrency": args.concurrency},
                          points)
    return conclude(report, args.out_dir, args.expect, args.tolerance, args.min_accuracy, args.max_false_refusal)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=C.INFERENCE_URL)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--split", default="test")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--limit", type=int, help="send at most N images, stratified by class (CI)")
    p.add_argument("--min-accuracy", type=float)
    p.add_argument("--max-false-refusal", type=float, help="fail when the OOD gate refuses more radiographs (0.01)")
    p.add_argument("--expect", type=Path, help="export's predictions_*.json to compare probabilities with")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--token", help="inference key (default: XRAY_TOKEN, XRAY_KEY_FILE or .serve's key file)")
    p.add_argument("--key-file", type=Path)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--retries", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
