"""Parity: real test images through PyTorch eager, TorchScript and ONNX Runtime must agree.

Every image goes through handlers.preprocess exactly as a served one does. P(pneumonia) from
handlers.backends.pneumonia_probability must agree within TOLERANCE and every label at the
card's threshold must be identical; the ONNX probabilities also give the offline test metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from handlers.backends import OnnxRunner, TorchScriptRunner, pneumonia_probability
from handlers.preprocess import to_model_input
from handlers.schemas import ModelCard
from training.metrics import binary_metrics
from training.sources import iter_split

TOLERANCE = 1e-5
MIN_IMAGES = 256
BATCH = 64


@dataclass
class Images:
    """Decoded [0, 1] grayscale images of a split (full size), their names and labels."""

    names: list[str]
    grays: list[np.ndarray]
    labels: np.ndarray


def pick(n_total: int, n: int | None) -> list[int]:
    """Indices of the images to check: all by default; else n (at least MIN_IMAGES), evenly spread
    over the sorted split so both classes are in."""
    if n is None or n >= n_total:
        return list(range(n_total))
    n = max(n, min(MIN_IMAGES, n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n).round()})


def load_images(data_dir: Path, split: str = "test", n: int | None = None) -> Images:
    items = list(tqdm(iter_split(data_dir, split), desc=f"decode {split}", unit="img", disable=None, leave=False))
    if not items:
        raise FileNotFoundError(f"no images in the '{split}' split of {data_dir}")
    chosen = [items[i] for i in pick(len(items), n)]
    return Images([c[0] for c in chosen], [c[1] for c in chosen], np.array([c[2] for c in chosen], np.int64))


def model_inputs(images: Images, card: ModelCard, start: int, stop: int) -> np.ndarray:
    return np.stack([to_model_input(g, card.input_size, card.mean, card.std) for g in images.grays[start:stop]])


def eager_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(x)).numpy()


def compare(probs: dict[str, np.ndarray], threshold: float, tol: float = TOLERANCE) -> dict[str, Any]:
    """probs: {'eager': p, 'torchscript': p, 'onnx': p} -> diffs, label agreement, verdict."""
    eager = probs["eager"]
    diffs = {k: float(np.max(np.abs(p - eager), initial=0.0)) for k, p in probs.items() if k != "eager"}
    labels = {k: p >= threshold for k, p in probs.items()}
    identical = all(np.array_equal(labels["eager"], v) for v in labels.values())
    n_diff = int(sum(np.sum(labels["eager"] != v) for v in labels.values()))
    finite = all(np.isfinite(p).all() for p in probs.values())
    return {"max_abs_diff_torchscript": diffs["torchscript"], "max_abs_diff_onnx": diffs["onnx"],
            "labels_identical": identical, "label_mismatches": n_diff, "tolerance": tol,
            "passed": bool(finite and identical and max(diffs.values()) <= tol)}


def check_model(model: torch.nn.Module, card: ModelCard, onnx_path: Path, torchscript_path: Path,
                images: Images, batch: int = BATCH, tol: float | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Run the three backends over IMAGES; return the family's report and the ONNX probabilities."""
    tol = TOLERANCE if tol is None else tol
    runners = {"onnx": OnnxRunner(onnx_path), "torchscript": TorchScriptRunner(torchscript_path)}
    for path, runner in zip((onnx_path, torchscript_path), runners.values(), strict=True):
        if runner.card != card:
            raise ValueError(f"{path}: the card it carries differs from the checkpoint's card")
    logits: dict[str, list[np.ndarray]] = {"eager": [], "torchscript": [], "onnx": []}
    for start in tqdm(range(0, len(images.names), batch), desc=f"parity {card.name}", unit="batch",
                      disable=None, leave=False):
        x = model_inputs(images, card, start, start + batch)
        logits["eager"].append(eager_logits(model, x))
        for name, runner in runners.items():
            logits[name].append(runner(x))
    probs = {k: pneumonia_probability(np.concatenate(v), card.head) for k, v in logits.items()}
    report = {"n_images": len(images.names), "threshold": card.threshold, **compare(probs, card.threshold, tol)}
    report["test_metrics"] = _json_safe(binary_metrics(images.labels, probs["onnx"], card.threshold))
    # What training measured on its own pipeline: equal when both saw the same whole test split.
    report["training_test_accuracy"] = card.test_metrics.get("accuracy")
    return report, probs["onnx"]


def predictions(family: str, card: ModelCard, images: Images, prob: np.ndarray) -> dict[str, Any]:
    """The offline ONNX Runtime predictions, one entry per image, for comparison with the live server."""
    return {"model": family, "threshold": card.threshold, "predictions": [
        {"file": name, "label": int(label), "probability": float(p),
         "predicted": card.class_names[int(p >= card.threshold)]}
        for name, label, p in zip(images.names, images.labels, prob, strict=True)]}


def format_line(family: str, report: dict[str, Any]) -> str:
    m = report["test_metrics"]
    verdict = "PASS" if report["passed"] else "FAIL"
    return (f"{verdict} {family:<8} n={report['n_images']:<4} |ts-eager|={report['max_abs_diff_torchscript']:.2e} "
            f"|onnx-eager|={report['max_abs_diff_onnx']:.2e} labels_identical={report['labels_identical']} "
            f"t={report['threshold']:.3f} acc={m['accuracy']:.4f} auc={_fmt(m['roc_auc'])}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}


def all_passed(reports: Sequence[dict[str, Any]]) -> bool:
    return bool(reports) and all(r["passed"] for r in reports)
