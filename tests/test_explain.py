"""Grad-CAM explanations: in-process on the exported TorchScript CNN, and through POST /explanations/xray."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from handlers import preprocess
from handlers.backends import load_runner
from handlers.constants import MODEL_NAME
from handlers.explain import NotExplainable, grad_cam, load_explainer
from handlers.schemas import ErrorBody, Explanation, Prediction
from serving.settings import ServeSettings
from tests.helpers import keys, png_bytes, run_cli


def shifted(gray: np.ndarray, dx: int) -> np.ndarray:
    """The image moved dx pixels to the right; the uncovered strip repeats the edge column."""
    return np.concatenate([np.repeat(gray[:, :1], dx, axis=1), gray[:, :-dx]], axis=1)


def best_shift(moved: np.ndarray, ref: np.ndarray, max_shift: int) -> int:
    """The horizontal shift d that best aligns moved with ref moved d to the right."""
    def score(d: int) -> float:
        a, b = (moved[:, d:], ref[:, : ref.shape[1] - d]) if d >= 0 else (moved[:, :d], ref[:, -d:])
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    return max(range(-max_shift, max_shift + 1), key=score)


@pytest.fixture(scope="module")
def gray(sample_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample_jpeg)).convert("L"))


def test_grad_cam_shape_range_and_it_moves_with_the_content(export_dir: Path, gray: np.ndarray) -> None:
    card = load_runner(export_dir / "xraynet.onnx").card
    module = load_explainer(export_dir / "xraynet.torchscript.pt", "cpu")
    dx = gray.shape[1] // 5  # 20 % of the width
    inputs = np.stack([preprocess.preprocess(png_bytes(img), card.input_size, card.mean, card.std)
                       for img in (gray, shifted(gray, dx))])
    cams = grad_cam(module, inputs, card.head, [1, 1])
    assert cams.shape == (2, card.input_size, card.input_size)
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    expected = round(dx * card.input_size / gray.shape[1])
    found = best_shift(cams[1], cams[0], max_shift=card.input_size // 3)
    assert abs(found - expected) <= max(2, expected // 4), f"map moved {found} px, the image {expected} px"


def test_an_mlp_is_not_explainable(export_dir: Path) -> None:
    with pytest.raises(NotExplainable):
        load_explainer(export_dir / "mlp_bce.torchscript.pt", "cpu")


def explain(settings: ServeSettings, body: bytes, target: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {keys(settings)['inference']}", "Content-Type": "application/octet-stream"}
    if target:
        headers["X-Target-Class"] = target
    return httpx.post(f"{settings.inference_url}/explanations/{MODEL_NAME}", content=body, headers=headers, timeout=60)


@pytest.mark.server
@pytest.mark.slow
def test_explanations_endpoint(server: ServeSettings, sample_jpeg: bytes) -> None:
    r = explain(server, sample_jpeg)
    assert r.status_code == 200, r.text
    exp = Explanation.model_validate(r.json())
    cam = np.asarray(exp.heatmap)
    size = cam.shape[0]
    assert cam.shape == (size, size) and size >= 32 and np.isfinite(cam).all()
    assert exp.target == exp.prediction.label
    overlay = Image.open(io.BytesIO(base64.b64decode(exp.overlay_png)))
    assert overlay.format == "PNG" and overlay.size == (size, size)
    other = "NORMAL" if exp.target == "PNEUMONIA" else "PNEUMONIA"
    chosen = Explanation.model_validate(explain(server, sample_jpeg, target=other).json())
    assert chosen.target == other and not np.allclose(np.asarray(chosen.heatmap), cam)
    bad = explain(server, sample_jpeg, target="KNEE")
    assert bad.status_code == 400 and ErrorBody.model_validate(bad.json()).type == "invalid_target"
    multipart = httpx.post(f"{server.inference_url}/explanations/{MODEL_NAME}", timeout=60,
                           headers={"Authorization": f"Bearer {keys(server)['inference']}"},
                           files={"data": ("x.jpeg", sample_jpeg, "image/jpeg")}, data={"target": other})
    assert Explanation.model_validate(multipart.json()).target == other
    assert explain(server, b"not an image").status_code == 415


@pytest.mark.server
@pytest.mark.slow
def test_predictions_and_explanations_share_a_batch(server: ServeSettings, sample_jpeg: bytes) -> None:
    def predict() -> httpx.Response:
        return httpx.post(f"{server.inference_url}/predictions/{MODEL_NAME}", content=sample_jpeg, timeout=60,
                          headers={"Authorization": f"Bearer {keys(server)['inference']}",
                                   "Content-Type": "image/jpeg"})

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(explain, server, sample_jpeg) if i % 2 else pool.submit(predict) for i in range(8)]
        for i, f in enumerate(futures):
            r = f.result()
            assert r.status_code == 200, r.text
            (Explanation if i % 2 else Prediction).model_validate(r.json())


@pytest.mark.server
@pytest.mark.slow
def test_client_explain_writes_an_overlay(server: ServeSettings, data_dir: Path, tmp_path: Path) -> None:
    image = next((data_dir / "test" / "NORMAL").glob("*.jp*g"))
    out = tmp_path / "overlay.png"
    proc = run_cli("serving.client", "explain", str(image), "-o", str(out), "--target", "PNEUMONIA",
                   "--url", server.inference_url, "--key-file", str(server.key_file))
    assert "Grad-CAM for PNEUMONIA" in proc.stdout
    overlay = Image.open(out)
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size[0] >= 32
