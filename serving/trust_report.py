"""The trust part of `make evaluate`: calibration (ECE, Brier, reliability diagram), the metrics at
each named operating point, and the radiographs the OOD gate refused (false refusals).

The served probability is the calibrated one, so the figures are computed from what was served.
Each point's threshold is read from the server itself (one request per point), so the metrics at a
point are exactly what a client choosing it would get.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from handlers.trust import POINT_NAMES
from serving.client import Result, XrayClient, XrayHTTPError
from training.calibration import N_BINS, brier, ece, reliability_diagram
from training.metrics import binary_metrics

REFUSAL_TYPE = "not_chest_xray"


def is_ood_refusal(result: Result) -> bool:
    """The live client's XrayHTTPError and the in-process worker's Refused both carry the ErrorBody."""
    return getattr(getattr(result.error, "error", None), "type", None) == REFUSAL_TYPE


async def point_thresholds(client: XrayClient, body: bytes) -> dict[str, float]:
    """Each named point's threshold as the server applies it (points the model lacks are left out)."""
    out = {}
    for name in POINT_NAMES:
        try:
            out[name] = (await client.predict(body, operating_point=name)).threshold
        except XrayHTTPError as exc:
            if exc.error.type not in ("unknown_operating_point", REFUSAL_TYPE):
                raise
    return out


def section(y: np.ndarray, prob: np.ndarray, thresholds: dict[str, float], refused: list[str],
            n_images: int) -> dict[str, Any]:
    return {"ece": ece(y, prob) if len(y) else None, "brier": brier(y, prob) if len(y) else None,
            "ece_bins": N_BINS, "ood_refused_radiographs": refused,
            "false_refusal_rate": len(refused) / n_images if n_images else 0.0,
            "points": {name: binary_metrics(y, prob, t) for name, t in thresholds.items()}}


def rows(trust: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("false refusals (OOD gate)", f"{len(trust['ood_refused_radiographs'])} "
            f"({trust['false_refusal_rate']:.2%})")]
    if trust["ece"] is not None:
        out.append((f"ECE ({trust['ece_bins']} bins) / Brier", f"{trust['ece']:.4f} / {trust['brier']:.4f}"))
    for name, m in trust["points"].items():
        out.append((f"point {name} (t={m['threshold']:.4f})",
                    f"sens {m['sensitivity']:.4f} spec {m['specificity']:.4f} "
                    f"bal acc {m['balanced_accuracy']:.4f} [tn fp; fn tp] = "
                    f"[{m['tn']} {m['fp']}; {m['fn']} {m['tp']}]"))
    return out


def draw(y: np.ndarray, prob: np.ndarray, out_path: Path, split: str) -> None:
    """The reliability diagram of the served probabilities (the report shows it beside roc.png)."""
    if len(np.unique(y)) == 2:
        reliability_diagram(y, {"served": prob}, out_path, title=f"reliability (served, {split})")
