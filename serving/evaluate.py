"""make evaluate: every image of a split through the live endpoint -> clinical metrics and latency.

    python -m serving.evaluate [--url INFERENCE_URL] [--data-dir D] [--split test]
                               [--concurrency 16] [--limit N] [--min-accuracy A]
                               [--expect artifacts/export/predictions_xraynet.json] [--tolerance 1e-5]
                               [--out-dir reports/evaluate]

D is an ImageFolder tree (SPLIT/{NORMAL,PNEUMONIA}/*.jpeg) or a folder with the course's
x_test_normal.npy / x_test_pneumonia.npy (or test_normal.npy / ...): each array is sent as a
.npy body. Metrics are computed on the SERVED probabilities at the SERVED threshold. Writes
OUT/evaluate.json, OUT/evaluate.md, OUT/roc.png and OUT/confusion.png.

Exit status: 0 ok; 1 when an image is unanswered, accuracy < --min-accuracy or a served
probability differs from --expect; 2 when the server is unreachable or the input is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from handlers import constants as C
from handlers.schemas import CLASS_NAMES
from serving.client import Result, XrayClient, XrayHTTPError, XrayUnavailable
from serving.load import Item, list_items, percentiles_ms, stratified
from training.metrics import binary_metrics
from training.plots import plot_confusion, plot_roc
from training.sources import default_data_dir

DEFAULT_OUT = C.REPORTS_DIR / "evaluate"


class EvaluateError(RuntimeError):
    """Reported as one line on stderr; `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


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


def compare(expect_path: Path, served: dict[str, float], threshold: float, tolerance: float) -> dict[str, Any]:
    """Served vs offline (export's predictions_*.json) P(PNEUMONIA), by file name."""
    try:
        offline_doc = json.loads(Path(expect_path).read_text())
        offline = {p["file"]: float(p["probability"]) for p in offline_doc["predictions"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluateError(f"--expect {expect_path}: not an export predictions file: {exc}", 2) from None
    common = sorted(set(offline) & set(served))
    if not common:
        raise EvaluateError(f"--expect {expect_path}: none of its files was served (wrong split or data dir?)", 1)
    diffs = {name: abs(served[name] - offline[name]) for name in common}
    mismatches = [{"file": n, "served": served[n], "offline": offline[n], "diff": d}
                  for n, d in sorted(diffs.items(), key=lambda kv: -kv[1]) if d > tolerance]
    offline_thr = offline_doc.get("threshold")
    return {"path": str(expect_path), "model": offline_doc.get("model"), "threshold": offline_thr,
            "threshold_matches": offline_thr is None or abs(float(offline_thr) - threshold) <= 1e-9,
            "tolerance": tolerance, "compared": len(common), "not_served": len(set(offline) - set(served)),
            "max_abs_diff": max(diffs.values()), "mismatches": mismatches}


def build_report(items: list[Item], results: dict[str, Result], wall_s: float, args: argparse.Namespace) -> dict:
    answered = [(name, label) for name, _, label in items if results[name].ok]
    unanswered = [{"file": name, "error": str(results[name].error)} for name, _, _ in items if not results[name].ok]
    preds = [results[name].prediction for name, _ in answered]
    y = np.asarray([label for _, label in answered])
    prob = np.asarray([p.probability for p in preds])
    thresholds = sorted({p.threshold for p in preds})
    models = sorted({f"{p.model} {p.version}" for p in preds})
    first = preds[0]
    attempts = [r.attempts for r in results.values()]
    return {
        "url": args.url, "data_dir": str(args.data_dir), "split": args.split, "images": len(items),
        "answered": len(answered), "unanswered": unanswered,
        "model": first.model, "version": first.version, "backend": first.backend, "device": first.device,
        "threshold": thresholds[0], "thresholds_seen": thresholds, "models_seen": models,
        "metrics": binary_metrics(y, prob, thresholds[0]),
        "served_label_disagrees_with_threshold": sum(
            p.label != CLASS_NAMES[int(p.probability >= p.threshold)] for p in preds),
        "latency_ms": percentiles_ms([results[name].latency_s for name, _ in answered]),
        "throughput_rps": round(len(items) / wall_s, 2), "wall_s": round(wall_s, 2),
        "concurrency": args.concurrency, "requests_sent": sum(attempts),
        "retried_images": sum(a > 1 for a in attempts),
        "predictions": [{"file": name, "label": label, "probability": p.probability, "predicted": p.label,
                         "latency_ms": round(results[name].latency_s * 1000, 2),
                         "attempts": results[name].attempts} for (name, label), p in zip(answered, preds, strict=True)],
    }


def table(report: dict) -> list[tuple[str, str]]:
    m, lat = report["metrics"], report["latency_ms"]
    rows = [("images answered", f"{report['answered']} / {report['images']}"),
            ("model", f"{report['model']} {report['version']} ({report['backend']}, {report['device']})"),
            ("threshold", f"{report['threshold']:.4f}")]
    rows += [(k.replace("_", " "), f"{m[k]:.4f}") for k in
             ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")]
    rows += [("confusion [tn fp; fn tp]", f"[{m['tn']} {m['fp']}; {m['fn']} {m['tp']}]"),
             ("latency p50 / p95 / p99", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} ms"),
             ("throughput", f"{report['throughput_rps']:.1f} img/s at concurrency {report['concurrency']}")]
    if "expect" in report:
        e = report["expect"]
        rows.append(("served vs offline", f"{e['compared']} compared, max abs diff {e['max_abs_diff']:.2e}, "
                     f"{len(e['mismatches'])} over {e['tolerance']:g}"))
    return rows


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluate.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Live endpoint evaluation: {report['split']} split", "",
             f"{report['url']}, data {report['data_dir']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table(report)]
    if report["unanswered"]:
        lines += ["", "## Unanswered", ""] + [f"- {u['file']}: {u['error']}" for u in report["unanswered"]]
    if report.get("expect", {}).get("mismatches"):
        lines += ["", "## Served vs offline mismatches", ""]
        lines += [f"- {m['file']}: served {m['served']:.6f}, offline {m['offline']:.6f}"
                  for m in report["expect"]["mismatches"][:50]]
    lines += ["", "![ROC](roc.png) ![confusion](confusion.png)", ""]
    (out_dir / "evaluate.md").write_text("\n".join(lines))
    y = np.asarray([p["label"] for p in report["predictions"]])
    prob = np.asarray([p["probability"] for p in report["predictions"]])
    if len(np.unique(y)) == 2:
        plot_roc(y, prob, out_dir / "roc.png", title=f"ROC (served, {report['split']})")
    pred = (prob >= report["threshold"]).astype(int)
    plot_confusion(y, pred, out_dir / "confusion.png", title=f"served, threshold {report['threshold']:.3f}")


def evaluate(args: argparse.Namespace) -> int:
    try:
        items = stratified(list_items(args.data_dir, args.split), args.limit)
    except FileNotFoundError as exc:
        raise EvaluateError(str(exc), 2) from None

    async def run() -> tuple[dict[str, Result], float]:
        async with XrayClient(args.url, args.token, args.key_file, concurrency=args.concurrency,
                              timeout=args.timeout, retries=args.retries) as client:
            return await collect(client, items, args.url)

    results, wall_s = asyncio.run(run())
    if not any(r.ok for r in results.values()):
        raise EvaluateError(f"no image was answered; first error: {next(iter(results.values())).error}", 1)
    report = build_report(items, results, wall_s, args)
    if args.expect:
        served = {p["file"]: p["probability"] for p in report["predictions"]}
        report["expect"] = compare(args.expect, served, report["threshold"], args.tolerance)
    write_outputs(report, args.out_dir)
    width = max(len(k) for k, _ in table(report))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in table(report)))
    print(f"wrote {args.out_dir}/evaluate.json, evaluate.md, roc.png, confusion.png")
    return check(report, args.min_accuracy)


def check(report: dict, min_accuracy: float | None) -> int:
    failures = []
    if report["unanswered"]:
        names = ", ".join(u["file"] for u in report["unanswered"][:20])
        failures.append(f"{len(report['unanswered'])} image(s) unanswered: {names}")
    accuracy = report["metrics"]["accuracy"]
    if min_accuracy is not None and accuracy < min_accuracy:
        failures.append(f"accuracy {accuracy:.4f} < --min-accuracy {min_accuracy}")
    expect = report.get("expect")
    if expect and expect["mismatches"]:
        names = ", ".join(f"{m['file']} ({m['diff']:.2e})" for m in expect["mismatches"][:10])
        failures.append(f"{len(expect['mismatches'])} served probabilities differ from {expect['path']} by more "
                        f"than {expect['tolerance']:g}: {names}")
    if expect and not expect["threshold_matches"]:
        failures.append(f"served threshold {report['threshold']} != offline threshold {expect['threshold']}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=C.INFERENCE_URL)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--split", default="test")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--limit", type=int, help="send at most N images, stratified by class (CI)")
    p.add_argument("--min-accuracy", type=float)
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
