"""Calibration and operating points, fitted on the validation split. Torch-free (the client uses it).

    Platt scaling    P(PNEUMONIA) = sigmoid(a * margin + b), margin = the model's logit margin
                     (BCE: the logit; CE: l1 - l0), fitted by scikit-learn's LogisticRegression
    temperature      the same with b = 0 (a = 1/T); kept for comparison, Platt is what is served
                     because the class-balanced training loss shifts the margin, which only b undoes
    ECE              15 equal-width bins of the predicted P(PNEUMONIA): sum |B|/N |mean p - fraction positive|
    Brier            scikit-learn's brier_score_loss
    operating points thresholds on the calibrated probability, chosen on validation:
                     balanced (Youden's J), high_sensitivity (sensitivity >= 0.98, the highest such
                     threshold), high_specificity (specificity >= 0.98, the lowest such threshold)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression

from handlers.schemas import DEFAULT_POINT, Calibration, OperatingPoint
from handlers.trust import calibrated, margin_of
from training.metrics import binary_metrics, youden_threshold

N_BINS = 15
TARGET = 0.98  # the sensitivity / specificity the named points promise on validation

__all__ = ["DEFAULT_POINT", "N_BINS", "brier", "ece", "fit_operating_points", "fit_platt", "fit_temperature",
           "margin_of", "metrics_at_points", "reliability_diagram"]


def fit_platt(margin: np.ndarray, y: np.ndarray) -> Calibration:
    """Logistic regression of the label on the margin (no regularisation to speak of)."""
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(margin, np.float64)[:, None], np.asarray(y))
    return Calibration(method="platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


def fit_temperature(margin: np.ndarray, y: np.ndarray) -> Calibration:
    """The temperature T (a = 1/T, b = 0) that minimises the validation log loss."""
    margin, y = np.asarray(margin, np.float64), np.asarray(y)

    def nll(log_a: float) -> float:
        p = np.clip(1 / (1 + np.exp(-np.exp(log_a) * margin)), 1e-12, 1 - 1e-12)
        return -float(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    res = minimize_scalar(nll, bounds=(-6, 6), method="bounded")
    return Calibration(method="temperature", a=float(np.exp(res.x)), b=0.0)


def _bins(prob: np.ndarray, n_bins: int) -> np.ndarray:
    # The binning of sklearn.calibration.calibration_curve(strategy="uniform"), so ECE and the diagram agree.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], prob)


def ece(y: np.ndarray, prob: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error of P(PNEUMONIA) over equal-width bins."""
    y, prob = np.asarray(y, np.float64), np.asarray(prob, np.float64)
    ids = _bins(prob, n_bins)
    total = 0.0
    for b in np.unique(ids):
        sel = ids == b
        total += sel.sum() / len(y) * abs(prob[sel].mean() - y[sel].mean())
    return float(total)


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    return float(skm.brier_score_loss(np.asarray(y), np.asarray(prob)))


def _highest_threshold_with_sensitivity(y: np.ndarray, prob: np.ndarray, target: float) -> float:
    _fpr, tpr, thr = skm.roc_curve(y, prob, drop_intermediate=False)
    ok = np.nonzero(tpr >= target)[0]  # thresholds decrease along the curve: the first is the highest
    return float(np.clip(thr[ok[0]], 0.0, 1.0))


def _lowest_threshold_with_specificity(y: np.ndarray, prob: np.ndarray, target: float) -> float:
    fpr, _tpr, thr = skm.roc_curve(y, prob, drop_intermediate=False)
    ok = np.nonzero(1 - fpr >= target)[0]  # the last one keeps specificity and has the most sensitivity
    return float(np.clip(thr[ok[-1]], 0.0, 1.0))


def fit_operating_points(y: np.ndarray, prob: np.ndarray, target: float = TARGET) -> dict[str, OperatingPoint]:
    """The named thresholds on the calibrated validation probabilities, with what each gives there."""
    y = np.asarray(y).astype(int)
    thresholds = {
        "balanced": youden_threshold(y, prob),
        "high_sensitivity": _highest_threshold_with_sensitivity(y, prob, target),
        "high_specificity": _lowest_threshold_with_specificity(y, prob, target),
    }
    descriptions = {"balanced": "Youden's J (sensitivity + specificity - 1) highest on validation",
                    "high_sensitivity": f"sensitivity >= {target} on validation (screening: few missed pneumonias)",
                    "high_specificity": f"specificity >= {target} on validation (few false alarms)"}
    out = {}
    for name, t in thresholds.items():
        m = binary_metrics(y, prob, t)
        out[name] = OperatingPoint(threshold=t, description=descriptions[name],
                                   val_sensitivity=m["sensitivity"], val_specificity=m["specificity"])
    return out


def metrics_at_points(y: np.ndarray, prob: np.ndarray, points: dict[str, OperatingPoint]) -> dict[str, dict]:
    return {name: binary_metrics(y, prob, p.threshold) for name, p in points.items()}


def calibration_report(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    return {"ece": ece(y, prob), "brier": brier(y, prob), "n": len(y)}


def reliability_diagram(y: np.ndarray, curves: dict[str, np.ndarray], path: Path, title: str = "",
                        ax: object | None = None) -> Path | None:
    """Fraction positive vs mean predicted P(PNEUMONIA) per bin, one line per named probability,
    with the bin counts as a histogram below. Draws into AX when given (beside a ROC), else saves PATH."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = None
    if ax is None:
        fig = Figure(figsize=(5, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect")
    for label, prob in curves.items():
        frac, mean = calibration_curve(y, prob, n_bins=N_BINS, strategy="uniform")
        ax.plot(mean, frac, marker="o", ms=3, label=f"{label} (ECE {ece(y, prob):.3f}, Brier {brier(y, prob):.3f})")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted P(PNEUMONIA)"), ax.set_ylabel("fraction PNEUMONIA")
    ax.set_title(title or f"reliability ({N_BINS} bins)")
    ax.legend(loc="upper left", fontsize=7)
    if fig is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path
    return None


def calibrate_logits(logits: np.ndarray, head: str, cal: Calibration) -> np.ndarray:
    return calibrated(margin_of(logits, head), cal)
