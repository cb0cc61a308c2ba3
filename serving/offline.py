"""The course's two workflows without a server: the TorchServe handler runs in this process.

    python -m serving.offline predict IMAGE [IMAGE...] [--model M] [--json]
    python -m serving.offline evaluate [--model M] [--data-dir D] [--split test] [--limit N]
                                       [--batch-size B] [--min-accuracy A] [--expect predictions.json]
                                       [--out-dir reports/evaluate-offline]

M is a .mar (served exactly as packed), an exported model (.onnx, .torchscript.pt) or a training
checkpoint (.pt, exported to ONNX first); default: model_store/xray.mar if there is one, else
artifacts/export/cnn.onnx. D is anything `make evaluate` reads: an ImageFolder tree, a labelled
folder ({NORMAL,PNEUMONIA}/*), a folder holding the course's x_test_normal.npy and
x_test_pneumonia.npy (each array is sent as a .npy body, as the live evaluation sends it), or a
MedMNIST .npz. `predict` prints the label, P(PNEUMONIA), the threshold and each class's
confidence; `evaluate` writes the report `make evaluate` writes (serving.evaluation), with
mode "offline".

Exit status: 0 ok; 1 when an image is refused, accuracy < --min-accuracy or a probability
differs from --expect; 2 when the model or the data is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from handlers import constants as C
from serving.evaluation import EvaluateError, build_report, conclude
from serving.inprocess import InProcessWorker, ModelSourceError, WorkerAnswer, check_model
from serving.load import list_items, stratified
from training.sources import default_data_dir

DEFAULT_MAR = C.MODEL_STORE / C.MAR_NAME
DEFAULT_EXPORTED = C.EXPORT_DIR / f"{C.DEFAULT_FAMILY}{C.MODEL_SUFFIX[C.DEFAULT_BACKEND]}"
DEFAULT_OUT = C.REPORTS_DIR / "evaluate-offline"


def default_model() -> Path:
    return DEFAULT_MAR if DEFAULT_MAR.is_file() else DEFAULT_EXPORTED


def describe(answer: WorkerAnswer) -> str:
    p = answer.prediction
    if p is None:
        return f"{answer.name}: error: {answer.error}"
    confidence = ", ".join(f"{name} {value:.1%}" for name, value in p.probabilities.items())
    return (f"{answer.name}: {p.label}  P(PNEUMONIA)={p.probability:.4f} (threshold {p.threshold:.4f}); "
            f"confidence {confidence}; {p.model} {p.version}, {p.backend} on {p.device}")


def predict_main(ns: argparse.Namespace) -> int:
    missing = [str(path) for path in ns.images if not path.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    with InProcessWorker.open(ns.model, threads=ns.threads) as worker:
        answers = worker.predict_many([(str(path), path) for path in ns.images])
    if ns.json:
        rows = [{"file": a.name, "status": a.status, **a.body} for a in answers]
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    else:
        print("\n".join(describe(a) for a in answers))
    return 0 if all(a.ok for a in answers) else 1


def evaluate_main(ns: argparse.Namespace) -> int:
    check_model(ns.model)  # before the data is read: a missing model is the likelier mistake
    try:
        items = stratified(list_items(ns.data_dir, ns.split), ns.limit)
    except FileNotFoundError as exc:
        raise EvaluateError(str(exc), 2) from None
    with InProcessWorker.open(ns.model, batch_size=ns.batch_size, threads=ns.threads) as worker:
        t0 = time.perf_counter()
        answers = worker.predict_many([(name, body) for name, body, _ in items])
        wall_s = time.perf_counter() - t0
        batch_size = worker.batch_size
        points = {name: op.threshold for name, op in worker.card.operating_points.items()}
    results = {a.name: a for a in answers}
    if not any(a.ok for a in answers):
        raise EvaluateError(f"no image was answered; first error: {answers[0].error}", 1)
    report = build_report(items, results, wall_s, {"mode": "offline", "model_file": str(ns.model),
                                                   "data_dir": ns.data_dir, "split": ns.split,
                                                   "batch_size": batch_size}, points)
    return conclude(report, ns.out_dir, ns.expect, ns.tolerance, ns.min_accuracy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, default=None,
                        help=f"default: {DEFAULT_MAR.relative_to(C.REPO_ROOT)} if present, else "
                             f"{DEFAULT_EXPORTED.relative_to(C.REPO_ROOT)}")
    common.add_argument("--threads", type=int, default=0, help="runner threads for a bare model file (0: all)")
    pr = sub.add_parser("predict", parents=[common], help="label and confidence of one or more images")
    pr.add_argument("images", nargs="+", type=Path)
    pr.add_argument("--json", action="store_true", help="print the handler's full answers as JSON")
    ev = sub.add_parser("evaluate", parents=[common], help="every image of a split -> the evaluation report")
    ev.add_argument("--data-dir", type=Path, default=default_data_dir())
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, help="at most N images, stratified by class")
    ev.add_argument("--batch-size", type=int, help="default: the archive's batchSize, else 8")
    ev.add_argument("--min-accuracy", type=float)
    ev.add_argument("--expect", type=Path, help="export's predictions_*.json to compare probabilities with")
    ev.add_argument("--tolerance", type=float, default=1e-5)
    ev.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ns = p.parse_args(argv)
    ns.model = ns.model or default_model()
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        return predict_main(ns) if ns.command == "predict" else evaluate_main(ns)
    except ModelSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EvaluateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status


if __name__ == "__main__":
    # TorchServe's base handler warns at import about accelerators (OpenVINO, TensorRT) a CLI run
    # does not use; only the command line is quietened, not a process that imports this module.
    logging.getLogger("ts.torch_handler.base_handler").setLevel(logging.ERROR)
    sys.exit(main())
