"""Training's finishing step for trust: the OOD detector, calibration and operating points of a model.

    fit(model, data, head) -> TrustFit: what goes into the card (Calibration, OperatingPoints, OodGate)
                              and into the checkpoint (the detector's matrices, `ood_state`)
    guarded(model, ckpt)   -> the module export writes: (logits, ood_score) when the checkpoint has a
                              detector, else the model itself

Everything is fitted on the train split (detector statistics) and the validation split (detector
standardisation and threshold, Platt scaling, operating points); the test split is only measured.
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


def fit(model: nn.Module, data: dict[str, Any], head: str) -> TrustFit:
    """Fit the detector (train statistics, validation threshold), Platt scaling and the operating points."""
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
    gate = OodGate(method="mahalanobis", threshold=det.threshold, layers=[s.name for s in det.layers],
                   two_sided=det.two_sided, val_quantile=ood.VAL_QUANTILE)
    val_scores = det.score(val_feats)
    report = {"val_ece_uncalibrated": cal.ece(y_val, raw_val), "val_ece": platt.val_ece,
              "val_brier_uncalibrated": cal.brier(y_val, raw_val), "val_brier": platt.val_brier,
              "val_ood_refused": float(np.mean(val_scores > det.threshold))}
    return TrustFit(platt, points, gate, detector_state(det), report)


def guarded(model: nn.Module, ckpt: dict[str, Any]) -> nn.Module:
    """The model to export: with its detector when the checkpoint has one."""
    state = ckpt.get("ood")
    return ood.Guarded(model, detector_from_state(state)).eval() if state else model.eval()


def split_report(fitted: TrustFit, y: np.ndarray, logits: np.ndarray, head: str,
                 ood_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Calibration and the metrics at each operating point on one split (test, in finish)."""
    prob = fitted.probability(logits, head)
    out: dict[str, Any] = {"ece": cal.ece(y, prob), "brier": cal.brier(y, prob),
                           "ece_uncalibrated": cal.ece(y, calibrated(margin_of(logits, head), None)),
                           "points": cal.metrics_at_points(y, prob, fitted.points)}
    if ood_scores is not None:
        out["ood_refused"] = float(np.mean(ood_scores > fitted.gate.threshold))
    return out
