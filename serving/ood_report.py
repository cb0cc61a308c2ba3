"""make ood: does the live endpoint refuse what is not a chest radiograph, and only that?

    python -m serving.ood_report [--url http://127.0.0.1:8080] [--data-dir D] [--split test]
                                 [--limit N] [--border-every 8] [--out-dir reports/ood]
                                 [--min-refused 0.95] [--max-false-refusal 0.01]

Sends (1) every image of the OOD evaluation set that training/ood_images.py makes (photographs,
textures, documents, charts, MRI/retina/histology, noise, flat fields, gradients; nothing stored),
(2) the split's radiographs as their files, and (3) the border cases made from every
`--border-every`-th radiograph (rotated 90, inverted, one lung, 64 px, a viewer screenshot).
A refusal is a 422 of type `not_chest_xray`; its body carries the score, a 200 answer carries it too.

Reports the refusal rate of the OOD set (per kind as well), the false-refusal rate of the
radiographs, the OOD AUROC of the served scores, and what happened to each border case ->
OUT/ood.json, OUT/ood.md, OUT/ood_scores.png. Exit status 1 when a floor is missed, 2 when the
server cannot be reached or the data is missing.
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
from serving.trust_report import REFUSAL_TYPE
from training.ood_images import border_cases, encode_png, ood_set
from training.sources import default_data_dir, list_image_folder

DEFAULT_OUT = C.REPORTS_DIR / "ood"


def outcome(result: Result) -> tuple[str, float | None]:
    """('passed' | 'refused' | 'error', the served OOD score)."""
    if result.prediction is not None:
        return "passed", result.prediction.ood_score
    err = result.error
    if isinstance(err, XrayHTTPError) and err.error.type == REFUSAL_TYPE:
        return "refused", err.error.ood_score
    return "error", None


def auroc(id_scores: list[float], ood_scores: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not id_scores or not ood_scores:
        return None
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.nan_to_num(np.r_[id_scores, ood_scores], nan=1e30, posinf=1e30)
    return float(roc_auc_score(y, s))


def rate(outcomes: list[str], what: str = "refused") -> float:
    return float(np.mean([o == what for o in outcomes])) if outcomes else float("nan")


def build(url: str, data_dir: Path, split: str, limit: int | None, border_every: int,
          concurrency: int) -> dict[str, Any]:
    from handlers.preprocess import decode

    files = list_image_folder(data_dir, split)
    if not files:
        raise FileNotFoundError(f"no {split} images in {data_dir}")
    if limit and limit < len(files):
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, limit).round()]
    ood = ood_set()
    sample = files[::border_every]
    border = list(border_cases([decode(p.read_bytes()) for p, _ in sample], [p.name for p, _ in sample]))
    labels = {f"radiograph/{p.name}": CLASS_NAMES[y] for p, y in files}
    items = ([(f"radiograph/{p.name}", p) for p, _ in files] + [(f"ood/{o.name}", encode_png(o.gray)) for o in ood]
             + [(f"border/{b.name}", encode_png(b.gray)) for b in border])
    kinds = {f"ood/{o.name}": o.kind for o in ood} | {f"border/{b.name}": b.kind for b in border}

    async def run() -> list[Result]:
        async with XrayClient(url, concurrency=concurrency) as client:
            return await client.predict_many(items, desc="ood")

    t0 = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - t0
    rows, threshold = [], None
    for (name, _), r in zip(items, results, strict=True):
        if isinstance(r.error, XrayHTTPError) and r.error.error.ood_threshold is not None:
            threshold = r.error.error.ood_threshold
        what, score = outcome(r)
        group = "radiograph" if name.startswith("radiograph/") else kinds[name]
        rows.append({"name": name, "group": group, "label": labels.get(name), "outcome": what, "score": score,
                     "error": None if r.ok or what == "refused" else str(r.error)})
    if any(isinstance(r.error, XrayUnavailable) for r in results):
        raise ConnectionError(f"{url}: the server did not answer")
    return summarize(rows, wall) | {"threshold": threshold}


def summarize(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    def of(pred: Any) -> list[dict[str, Any]]:
        return [r for r in rows if pred(r["group"])]

    radio = of(lambda g: g == "radiograph")
    foreign = of(lambda g: g != "radiograph" and not g.startswith("border/"))
    border = of(lambda g: g.startswith("border/"))
    scores = [r["score"] for r in radio if r["score"] is not None]
    ood_scores = [r["score"] for r in foreign if r["score"] is not None]
    by_kind = {k: rate([r["outcome"] for r in foreign if r["group"] == k])
               for k in sorted({r["group"] for r in foreign})}
    by_case = {k[7:]: rate([r["outcome"] for r in border if r["group"] == k])
               for k in sorted({r["group"] for r in border})}
    return {
        "n_radiographs": len(radio), "n_ood": len(foreign), "n_border": len(border), "seconds": round(wall_s, 1),
        "ood_refused": rate([r["outcome"] for r in foreign]),
        "false_refusal": rate([r["outcome"] for r in radio]),
        # A gate that refuses one class more often shifts who gets an answer: report it per class.
        "false_refusal_by_class": {c: rate([r["outcome"] for r in radio if r.get("label") == c])
                                   for c in sorted({r.get("label") for r in radio} - {None})},
        "ood_auroc": auroc(scores, ood_scores),
        "ood_refused_by_kind": by_kind, "border_refused": by_case,
        "errors": [r for r in rows if r["outcome"] == "error"],
        "ood_passed": [r["name"] for r in foreign if r["outcome"] == "passed"],
        "radiographs_refused": [r["name"] for r in radio if r["outcome"] == "refused"],
        "rows": rows,
    }


def markdown(rep: dict[str, Any]) -> str:
    lines = ["# Out-of-distribution gate (live endpoint)", "",
             "| what | value |", "|---|---:|",
             f"| non-radiographs refused | {rep['ood_refused']:.1%} of {rep['n_ood']} |",
             f"| radiographs refused (false refusals) | {rep['false_refusal']:.2%} of {rep['n_radiographs']} |",
             *(f"| {c} radiographs refused | {v:.2%} |" for c, v in rep["false_refusal_by_class"].items()),
             f"| OOD AUROC (served scores) | {rep['ood_auroc']:.4f} |" if rep["ood_auroc"] is not None else "",
             f"| threshold | {rep['threshold']:.3f} |" if rep.get("threshold") is not None else "",
             "", "| kind | refused |", "|---|---:|"]
    lines += [f"| {k} | {v:.0%} |" for k, v in rep["ood_refused_by_kind"].items()]
    lines += ["", "| border case | refused |", "|---|---:|"]
    lines += [f"| {k} | {v:.0%} |" for k, v in rep["border_refused"].items()]
    if rep["ood_passed"]:
        lines += ["", "Non-radiographs that passed: " + ", ".join(rep["ood_passed"])]
    if rep["radiographs_refused"]:
        lines += ["", "Radiographs refused: " + ", ".join(rep["radiographs_refused"])]
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot(rep: dict[str, Any], path: Path, threshold: float | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = {"radiographs": [r["score"] for r in rep["rows"] if r["group"] == "radiograph"],
              "non-radiographs": [r["score"] for r in rep["rows"]
                                  if r["group"] not in ("radiograph",) and not r["group"].startswith("border/")]}
    for label, s in groups.items():
        s = np.log10(np.clip([x for x in s if x is not None and np.isfinite(x)], 1e-3, None))
        ax.hist(s, bins=50, alpha=0.6, label=f"{label} ({len(s)})")
    if threshold:
        ax.axvline(np.log10(threshold), color="k", ls="--", label="threshold")
    ax.set_xlabel("log10 OOD score"), ax.set_ylabel("images"), ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=C.INFERENCE_URL)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="radiographs to send (default: the whole split)")
    p.add_argument("--border-every", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--min-refused", type=float, default=0.95)
    p.add_argument("--max-false-refusal", type=float, default=0.01)
    args = p.parse_args(argv)
    try:
        rep = build(args.url, args.data_dir or default_data_dir(), args.split, args.limit, args.border_every,
                    args.concurrency)
    except (FileNotFoundError, ConnectionError) as exc:
        print(f"ood: error: {exc}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "ood.json").write_text(json.dumps(rep, indent=1))
    (args.out_dir / "ood.md").write_text(markdown(rep))
    plot(rep, args.out_dir / "ood_scores.png", rep["threshold"])
    print(markdown(rep))
    failed = []
    if rep["ood_refused"] < args.min_refused:
        failed.append(f"refused {rep['ood_refused']:.1%} < {args.min_refused:.0%}")
    if rep["false_refusal"] > args.max_false_refusal:
        failed.append(f"false refusals {rep['false_refusal']:.2%} > {args.max_false_refusal:.0%}")
    if rep["errors"]:
        failed.append(f"{len(rep['errors'])} requests failed otherwise: {rep['errors'][0]}")
    if failed:
        print("ood: FLOOR MISSED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
