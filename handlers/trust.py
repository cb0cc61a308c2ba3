"""Trustworthy answers from the card's statistics: calibrated probability, named operating points,
and the out-of-distribution verdict. numpy only, so the handler, the client, training and the
export check all apply the same arithmetic.

The detector's heavy statistics (class means, whitening matrices) live inside the exported model,
which outputs `ood_score` beside the logits; the card carries the threshold, the calibration and
the operating points. training/ood.py and training/calibration.py fit them.
"""

from __future__ import annotations

import numpy as np

from handlers.schemas import DEFAULT_POINT, Calibration, OodGate, OperatingPoint

__all__ = ["DEFAULT_POINT", "OPERATING_POINT_FIELD", "OPERATING_POINT_HEADER", "TrustError", "calibrated",
           "is_foreign", "label_of", "margin_of", "resolve_point"]
POINT_NAMES = ("balanced", "high_sensitivity", "high_specificity")
OPERATING_POINT_HEADER = "x-operating-point"
OPERATING_POINT_FIELD = "operating_point"


class TrustError(ValueError):
    """A request the trust layer refuses: status and type for the JSON error body."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type, message


def margin_of(logits: np.ndarray, head: str) -> np.ndarray:
    """Logits [N, 1] (BCE) or [N, 2] (CE) -> the P(PNEUMONIA) logit margin, float64 [N]."""
    logits = np.asarray(logits, dtype=np.float64)
    expected = 1 if head == "bce" else 2
    if logits.ndim != 2 or logits.shape[1] != expected:
        raise ValueError(f"{head} head expects logits [N, {expected}], got {logits.shape}")
    return logits[:, 0] if head == "bce" else logits[:, 1] - logits[:, 0]


def calibrated(margin: np.ndarray, cal: Calibration | None) -> np.ndarray:
    """The calibrated P(PNEUMONIA) of each margin (the raw sigmoid when there is no calibration)."""
    a, b = (cal.a, cal.b) if cal is not None else (1.0, 0.0)
    z = np.clip(a * np.asarray(margin, np.float64) + b, -500.0, 500.0)
    return 1.0 / (1.0 + np.exp(-z))


def resolve_point(points: dict[str, OperatingPoint], requested: str | None,
                  default: str = DEFAULT_POINT) -> tuple[str, OperatingPoint]:
    """The operating point a request asked for (None: the default); unknown names are a 400."""
    name = (requested or default).strip()
    if name not in points:
        raise TrustError(400, "unknown_operating_point",
                         f"operating point '{name}' is not one of {sorted(points)}")
    return name, points[name]


def label_of(prob: float, threshold: float, class_names: tuple[str, str]) -> str:
    """The label the probability and the point's threshold give: the one rule every answer follows."""
    return class_names[int(prob >= threshold)]


def is_foreign(score: float, gate: OodGate | None) -> bool:
    """True when the image is refused as not a chest radiograph (a non-finite score is refused too)."""
    if gate is None:
        return False
    return not np.isfinite(score) or score > gate.threshold
