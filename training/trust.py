"""Training's finishing step for trust: the OOD detector, calibration and operating points of a model.

    fit(model, data, head) -> TrustFit: what goes into the card (Calibration, OperatingPoints, OodGate)
                              and into the checkpoint (the detector's matrices, `ood_state`)
    guarded(model, ckpt)   -> the module export writes: (logits, ood_score) when the checkpoint has a
                              detector, else the model itself

Everything is fitted on the train split (detector statistics), the validation split plus the train
split scored out of fold (detector standardisation and threshold) and the validation split (Platt
scaling, operating points); the test split is only measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from handlers.schemas import DEFAULT_POINT, Calibration, OodGate, OperatingPoint
from handlers.trust import calibrated, margin_of
from training import calibration as cal
from training import ood


@dataclass
class TrustFit:
    calibration: Calibration
    points: dict[str, OperatingPoint]
    gate: OodGate
    ood_state: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    detector: ood.Detector | None = None

    @property
    def threshold(self) -> float:
        return self.points[DEFAULT_POINT].threshold

    def card_fields(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "operating_points": self.points, "default_point": DEFAULT_POINT,
                "ood": self.gate, "threshold": self.threshold}

    def probability(self, logits: np.ndarray, head: str) -> np.ndarray:
        """The served P(PNEUMONIA) of these logits."""
        return calibrated(margin_of(logits, head), self.calibration)


def detector_state(det: ood.Detector) -> dict[str, Any]:
    """The detector as tensors and plain values: what torch.load(weights_only=True) reads back."""
    return {"use": list(det.use), "two_sided": det.two_sided, "threshold": det.threshold,
            "layers": [{"name": s.name, "whiten": torch.from_numpy(s.whiten.astype(np.float32)),
                        "means": torch.from_numpy(s.means.astype(np.float32)), "loc": s.loc, "scale": s.scale}
                       for s in det.layers]}


def detector_from_state(state: dict[str, Any]) -> ood.Detector:
    layers = [ood.LayerStats(d["name"], d["whiten"].double().numpy(), d["means"].double().numpy(),
                             float(d["loc"]), float(d["scale"])) for d in state["layers"]]
    return ood.Detector(layers, bool(state["two_sided"]), float(state["threshold"]), use=list(state["use"]))


def fit(model: nn.Module, data: dict[str, Any], head: str, tune: bool = True) -> TrustFit:
    """Fit the detector (train statistics, validation threshold), Platt scaling and the operating points.
    TUNE False keeps the default point at 0.5 (the course's untuned runs)."""
    y_train, y_val = data["train"].y.numpy(), data["val"].y.numpy()
    _, train_feats = ood.extract(model, data["train"].x)
    val_logits, val_feats = ood.extract(model, data["val"].x)
    names = ood.layer_names(model)
    det = ood.fit_detector(train_feats, y_train, val_feats, names)
    margin = margin_of(val_logits, head)
    platt = cal.fit_platt(margin, y_val)
    p_val = calibrated(margin, platt)
    raw_val = calibrated(margin, None)
    platt = platt.model_copy(update={"val_ece": cal.ece(y_val, p_val), "val_brier": cal.brier(y_val, p_val)})
    points = cal.fit_operating_points(y_val, p_val)
    if not tune:
        points[DEFAULT_POINT] = OperatingPoint(threshold=0.5, description="untuned: 0.5")
    gate = OodGate(method="mahalanobis", threshold=det.threshold, layers=[s.name for s in det.layers],
                   two_sided=det.two_sided, val_quantile=ood.VAL_QUANTILE,
                   reference=f"validation + training out of fold ({ood.FOLDS} folds)")
    val_scores = det.score(val_feats)
    report = {"val_ece_uncalibrated": cal.ece(y_val, raw_val), "val_ece": platt.val_ece,
              "val_brier_uncalibrated": cal.brier(y_val, raw_val), "val_brier": platt.val_brier,
              "val_ood_refused": float(np.mean(val_scores > det.threshold))}
    return TrustFit(platt, points, gate, detector_state(det), report, det)


def guarded(model: nn.Module, ckpt: dict[str, Any]) -> nn.Module:
    """The model to export: with its detector when the checkpoint has one."""
    state = ckpt.get("ood")
    return ood.Guarded(model, detector_from_state(state)).eval() if state else model.eval()


def split_report(fitted: TrustFit, model: nn.Module, split: Any, head: str) -> dict[str, Any]:
    """Calibration, the metrics at each operating point and the OOD refusals on one split."""
    logits, feats = ood.extract(model, split.x)
    y = split.y.numpy()
    prob = fitted.probability(logits, head)
    raw = calibrated(margin_of(logits, head), None)
    out: dict[str, Any] = {"ece": cal.ece(y, prob), "brier": cal.brier(y, prob), "ece_uncalibrated": cal.ece(y, raw),
                           "brier_uncalibrated": cal.brier(y, raw),
                           "points": cal.metrics_at_points(y, prob, fitted.points)}
    if fitted.detector is not None:
        out["ood_refused"] = float(np.mean(fitted.detector.score(feats) > fitted.gate.threshold))
    return out


def summary(fitted: TrustFit, model: nn.Module, data: dict[str, Any], head: str) -> dict[str, Any]:
    """What metrics.json records: the fitted values and the validation and test figures."""
    return {"calibration": fitted.calibration.model_dump(), "ood_threshold": fitted.gate.threshold,
            "operating_points": {k: v.model_dump() for k, v in fitted.points.items()},
            "val": split_report(fitted, model, data["val"], head),
            "test": split_report(fitted, model, data["test"], head)}
