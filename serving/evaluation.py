"""The evaluation report, one library for `make evaluate` (live endpoint) and `make evaluate-offline`
(the handler in this process): the metrics, tables, plots and exit checks of one run.

    items = stratified(list_items(data_dir, "test"), limit)     # serving.load: (name, body, label)
    report = build_report(items, answers, wall_s, meta)          # answers: name -> Answer
    write_outputs(report, out_dir); status = check(report, min_accuracy)

An Answer is anything with .ok, .prediction (a Prediction), .error, .latency_s and .attempts:
the live client's Result and the in-process worker's answer both are.
Writes OUT/evaluate.json, OUT/evaluate.md, OUT/roc.png and OUT/confusion.png.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from handlers import constants as C
from handlers.schemas import CLASS_NAMES, Prediction
from serving import trust_report
from serving.load import Item, percentiles_ms
from training.metrics import binary_metrics
from training.plots import plot_confusion, plot_roc

DEFAULT_OUT = C.REPORTS_DIR / "evaluate"


class Answer(Protocol):
    @property
    def ok(self) -> bool: ...

    prediction: Prediction | None
    error: object
    latency_s: float
    attempts: int


class EvaluateError(RuntimeError):
    """Reported as one line on stderr; `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def compare(expect_path: Path, served: dict[str, float], threshold: float, tolerance: float,
            refused: set[str] | None = None) -> dict[str, Any]:
    """Served vs offline (export's predictions_*.json) P(PNEUMONIA), by file name; and the OOD gate's
    decisions: an image refused live must be refused offline, and the other way round."""
    refused = refused or set()
    try:
        offline_doc = json.loads(Path(expect_path).read_text())
        offline = {p["file"]: float(p["probability"]) for p in offline_doc["predictions"]}
        offline_refused = {p["file"] for p in offline_doc["predictions"] if p.get("refused")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluateError(f"--expect {expect_path}: not an export predictions file: {exc}", 2) from None
    sent = set(served) | refused
    refusal_mismatches = sorted((refused ^ offline_refused) & sent & set(offline))
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
            "max_abs_diff": max(diffs.values()), "mismatches": mismatches,
            "refused_live": len(refused), "refusal_mismatches": refusal_mismatches}


def build_report(items: list[Item], results: Mapping[str, Answer], wall_s: float, meta: dict[str, Any],
                 point_thresholds: dict[str, float] | None = None) -> dict:
    """The report of one run. meta: mode ('live' or 'offline'), url or model_file, data_dir, split,
    concurrency (live) or batch_size (offline). point_thresholds: each operating point's threshold."""
    answered = [(name, label) for name, _, label in items if results[name].ok]
    # A radiograph the OOD gate refused was answered (422 not_chest_xray): a false refusal, not a failure.
    refused = [name for name, _, _ in items if trust_report.is_ood_refusal(results[name])]
    unanswered = [{"file": name, "error": str(results[name].error)} for name, _, _ in items
                  if not results[name].ok and name not in refused]
    preds = [results[name].prediction for name, _ in answered]
    y = np.asarray([label for _, label in answered])
    prob = np.asarray([p.probability for p in preds])
    thresholds = sorted({p.threshold for p in preds})
    models = sorted({f"{p.model} {p.version}" for p in preds})
    first = preds[0]
    attempts = [r.attempts for r in results.values()]
    return {
        "mode": meta.get("mode", "live"), "url": meta.get("url"), "model_file": meta.get("model_file"),
        "data_dir": str(meta["data_dir"]), "split": meta["split"], "images": len(items),
        "answered": len(answered), "unanswered": unanswered,
        "model": first.model, "version": first.version, "backend": first.backend, "device": first.device,
        "threshold": thresholds[0], "thresholds_seen": thresholds, "models_seen": models,
        "metrics": binary_metrics(y, prob, thresholds[0]),
        "served_label_disagrees_with_threshold": sum(
            p.label != CLASS_NAMES[int(p.probability >= p.threshold)] for p in preds),
        "latency_ms": percentiles_ms([results[name].latency_s for name, _ in answered]),
        "throughput_rps": round(len(items) / wall_s, 2), "wall_s": round(wall_s, 2),
        "concurrency": meta.get("concurrency"), "batch_size": meta.get("batch_size"), "requests_sent": sum(attempts),
        "retried_images": sum(a > 1 for a in attempts),
        "trust": trust_report.section(y, prob, point_thresholds or {}, refused, len(items)),
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
             ("throughput", f"{report['throughput_rps']:.1f} img/s " + (
                 f"at concurrency {report['concurrency']}" if report["mode"] == "live"
                 else f"in batches of {report['batch_size']}, in process"))]
    rows += trust_report.rows(report["trust"])
    if "expect" in report:
        e = report["expect"]
        rows.append(("served vs offline" if report["mode"] == "live" else "in process vs export",
                     f"{e['compared']} compared, max abs diff {e['max_abs_diff']:.2e}, "
                     f"{len(e['mismatches'])} over {e['tolerance']:g}; OOD refusals {e['refused_live']}, "
                     f"{len(e['refusal_mismatches'])} differ"))
    return rows


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluate.json").write_text(json.dumps(report, indent=1))
    live = report["mode"] == "live"
    title = "Live endpoint evaluation" if live else "Offline evaluation (the handler in process, no server)"
    lines = [f"# {title}: {report['split']} split", "",
             f"{report['url'] if live else report['model_file']}, data {report['data_dir']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table(report)]
    if report["unanswered"]:
        lines += ["", "## Unanswered", ""] + [f"- {u['file']}: {u['error']}" for u in report["unanswered"]]
    if report.get("expect", {}).get("mismatches"):
        lines += ["", "## Mismatches with --expect", ""]
        lines += [f"- {m['file']}: served {m['served']:.6f}, offline {m['offline']:.6f}"
                  for m in report["expect"]["mismatches"][:50]]
    lines += ["", "![ROC](roc.png) ![reliability](reliability.png) ![confusion](confusion.png)", ""]
    (out_dir / "evaluate.md").write_text("\n".join(lines))
    y = np.asarray([p["label"] for p in report["predictions"]])
    prob = np.asarray([p["probability"] for p in report["predictions"]])
    if len(np.unique(y)) == 2:
        plot_roc(y, prob, out_dir / "roc.png", title=f"ROC ({'served' if live else 'offline'}, {report['split']})")
        trust_report.draw(y, prob, out_dir / "reliability.png", report["split"])
    pred = (prob >= report["threshold"]).astype(int)
    plot_confusion(y, pred, out_dir / "confusion.png",
                   title=f"{'served' if live else 'offline'}, threshold {report['threshold']:.3f}")


def check(report: dict, min_accuracy: float | None, max_false_refusal: float | None = None) -> int:
    failures = []
    rate = report["trust"]["false_refusal_rate"]
    if max_false_refusal is not None and rate > max_false_refusal:
        failures.append(f"the OOD gate refused {rate:.2%} of the radiographs > --max-false-refusal {max_false_refusal}")
    if report["served_label_disagrees_with_threshold"]:
        failures.append(f"{report['served_label_disagrees_with_threshold']} served labels disagree with their "
                        "probability and threshold")
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
    if expect and expect["refusal_mismatches"]:
        failures.append(f"{len(expect['refusal_mismatches'])} images refused live but not offline or the other way "
                        f"round: {', '.join(expect['refusal_mismatches'][:10])}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def conclude(report: dict, out_dir: Path, expect: Path | None, tolerance: float, min_accuracy: float | None,
             max_false_refusal: float | None = None) -> int:
    """The end of a run, live or offline: compare with --expect, write the report, print its table,
    and return the exit status of the checks."""
    if expect:
        answered = {p["file"]: p["probability"] for p in report["predictions"]}
        report["expect"] = compare(expect, answered, report["threshold"], tolerance,
                                   set(report["trust"]["ood_refused_radiographs"]))
    write_outputs(report, out_dir)
    width = max(len(k) for k, _ in table(report))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in table(report)))
    print(f"wrote {out_dir}/evaluate.json, evaluate.md, roc.png, reliability.png, confusion.png")
    return check(report, min_accuracy, max_false_refusal)
