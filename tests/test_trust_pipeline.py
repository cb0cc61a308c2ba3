"""Trust through the real pipeline (the session fixtures: CI-sized training, export, a real TorchServe).

The figures of the floors (>= 95% refused, <= 1% false refusals, ECE <= 0.03) are for the full
models (`make train export archive serve evaluate ood`, README); CI-sized models are trained on 300
images for 1-2 epochs, so here the mechanics are asserted, not the floors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from handlers.backends import load_runner
from handlers.schemas import ErrorBody, ModelCard, Prediction
from serving.settings import ServeSettings
from tests.helpers import REPO, keys, png_bytes


def test_checkpoints_carry_calibration_points_and_the_detector(best_dir: Path) -> None:
    summary = json.loads((best_dir / "summary.json").read_text())
    for family, entry in summary["models"].items():
        ckpt = torch.load(best_dir / entry["checkpoint"], map_location="cpu", weights_only=True)
        card = ModelCard.model_validate(ckpt["card"])
        assert card.calibration is not None and card.calibration.method == "platt", family
        points = card.operating_points
        assert set(points) == {"balanced", "high_sensitivity", "high_specificity"}
        assert points["high_sensitivity"].val_sensitivity >= 0.98
        assert points["high_specificity"].val_specificity >= 0.98
        assert card.threshold == points[card.default_point].threshold
        assert card.ood is not None and np.isfinite(card.ood.threshold)
        state = ckpt["ood"]
        assert state["threshold"] == card.ood.threshold
        assert [layer["name"] for layer in state["layers"]] == card.ood.layers


def test_every_exported_model_outputs_its_ood_score_with_parity(export_dir: Path) -> None:
    report = json.loads((export_dir / "parity.json").read_text())["models"]
    for family, r in report.items():
        assert r["ood_passed"] and r["ood_refusals_identical"], family
        assert max(r["ood_max_rel_diff_onnx"], r["ood_max_rel_diff_torchscript"]) <= r["ood_rtol"]
        runner = load_runner(export_dir / r["onnx"])
        x = np.zeros((3, 1, runner.card.input_size, runner.card.input_size), np.float32)
        logits, score = runner.run(x)
        assert logits.shape == (3, runner.card.n_outputs) and score.shape == (3,)
        # A blank field, whatever its level, is far from every radiograph.
        assert (score > runner.card.ood.threshold).all(), family
        preds = json.loads((export_dir / f"predictions_{family}.json").read_text())["predictions"]
        assert all("ood_score" in p and "refused" in p for p in preds)


def post(settings: ServeSettings, body: bytes, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {keys(settings)['inference']}", "Content-Type": "application/octet-stream"}
    return httpx.post(f"{settings.inference_url}/predictions/xray", content=body, headers=auth | headers, timeout=60)


@pytest.mark.server
def test_live_refusal_points_and_batch_mates(server: ServeSettings, sample_jpeg: bytes) -> None:
    gray = png_bytes(np.full((256, 256), 128, np.uint8))
    white = png_bytes(np.full((300, 200), 255, np.uint8))
    alone = post(server, sample_jpeg)
    assert alone.status_code == 200, alone.text
    # Concurrent requests share a batch (the test archive waits 50 ms for one).
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post(server, b), [sample_jpeg, gray, white, sample_jpeg, gray, white]))
    assert [a.status_code for a in answers] == [200, 422, 422] * 2
    for a in answers[1::3] + answers[2::3]:
        err = ErrorBody.model_validate(a.json())
        assert err.type == "not_chest_xray" and err.ood_score > err.ood_threshold
        assert "label" not in a.json()
    for a in answers[0::3]:
        assert a.json() == alone.json(), "a radiograph's answer does not depend on its batch-mates"
    pred = Prediction.model_validate(alone.json())
    assert pred.operating_point == "balanced" and pred.ood_score is not None
    for name in ("high_sensitivity", "high_specificity"):
        p = Prediction.model_validate(post(server, sample_jpeg, **{"X-Operating-Point": name}).json())
        assert p.operating_point == name and p.probability == pred.probability
        assert p.label == ("PNEUMONIA" if p.probability >= p.threshold else "NORMAL")
    bad = post(server, sample_jpeg, **{"X-Operating-Point": "paranoid"})
    assert bad.status_code == 400 and bad.json()["type"] == "unknown_operating_point"


@pytest.mark.server
def test_make_ood_reports_refusals_auroc_and_border_cases(server: ServeSettings, data_dir: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "ood"
    proc = subprocess.run([sys.executable, "-m", "serving.ood_report", "--url", server.inference_url,
                           "--data-dir", str(data_dir), "--limit", "40", "--border-every", "20",
                           "--out-dir", str(out), "--min-refused", "0", "--max-false-refusal", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XRAY_KEY_FILE": str(server.key_file)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "ood.json").read_text())
    assert rep["n_radiographs"] == 40 and rep["n_ood"] >= 150 and not rep["errors"]
    assert set(rep["border_refused"]) == {"rotated_90", "inverted", "one_lung", "downscaled_64", "screenshot"}
    assert rep["ood_refused_by_kind"]["flat"] == 1.0
    assert 0.5 < rep["ood_auroc"] <= 1.0
    assert (out / "ood.md").is_file() and (out / "ood_scores.png").stat().st_size > 0
