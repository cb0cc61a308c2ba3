"""The course's workflows without a server (serving.offline): the handler in process.

Fast part: a tiny ONNX model written here (flatten + one dense layer, so the expected
probability is a line of numpy) and data generated here: the course's .npy pair, a labelled
folder, single images. Live part (marks server): the test archive through TorchServe and
through the in-process worker give the same answers, good and bad, image by image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from handlers.preprocess import preprocess
from handlers.schemas import ErrorBody, ModelCard, Prediction
from serving import offline
from serving.inprocess import InProcessWorker
from serving.load import list_items, stratified
from serving.settings import ServeSettings
from tests.bad_inputs import cases
from tests.helpers import keys, linear_onnx, run_cli
from training.metrics import binary_metrics

SIZE = 32
CARD = ModelCard(name="tiny", arch="mlp", head="ce", input_size=SIZE, mean=0.5, std=0.25, threshold=0.4)
WEIGHTS = np.random.default_rng(0).normal(0, 0.05, (SIZE * SIZE, 2)).astype(np.float32)


def expected_probability(body: bytes) -> float:
    x = preprocess(body, SIZE, CARD.mean, CARD.std).reshape(1, -1).astype(np.float64)
    logits = x @ WEIGHTS
    return float(1 / (1 + np.exp(-(logits[0, 1] - logits[0, 0]))))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return linear_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx", CARD, WEIGHTS)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_evaluate_offline_on_the_course_npy_pair(tiny_model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(3)
    normal = rng.integers(0, 256, (5, 48, 48), dtype=np.uint8)
    pneumonia = rng.integers(0, 256, (7, 48, 48), dtype=np.uint8)
    np.save(tmp_path / "x_test_normal.npy", normal)
    np.save(tmp_path / "x_test_pneumonia.npy", pneumonia)
    out = tmp_path / "report"
    assert offline.main(["evaluate", "--model", str(tiny_model), "--data-dir", str(tmp_path),
                         "--out-dir", str(out), "--batch-size", "4"]) == 0
    stdout = capsys.readouterr().out
    assert "roc auc" in stdout and "in batches of 4, in process" in stdout
    for name in ("evaluate.json", "evaluate.md", "roc.png", "confusion.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "evaluate.json").read_text())
    assert report["mode"] == "offline" and report["model_file"] == str(tiny_model)
    assert report["answered"] == report["images"] == 12 and not report["unanswered"]
    names = [p["file"] for p in report["predictions"]]
    assert names[0] == "test/NORMAL/00000" and names[-1] == "test/PNEUMONIA/00006"
    expected = [expected_probability(npy_bytes(a)) for a in [*normal, *pneumonia]]
    np.testing.assert_allclose([p["probability"] for p in report["predictions"]], expected, atol=1e-6)
    assert [p["predicted"] for p in report["predictions"]] == [
        "PNEUMONIA" if p >= CARD.threshold else "NORMAL" for p in expected]
    y = np.array([0] * 5 + [1] * 7)
    for key, value in binary_metrics(y, np.array(expected), CARD.threshold).items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_predict_offline_prints_label_and_confidence(tiny_model: Path, tmp_path: Path) -> None:
    image = (np.random.default_rng(4).random((64, 64)) * 255).astype(np.uint8)
    png = tmp_path / "chest.png"
    Image.fromarray(image).save(png)
    p = expected_probability(png.read_bytes())
    label = "PNEUMONIA" if p >= CARD.threshold else "NORMAL"
    proc = run_cli("serving.offline", "predict", str(png), "--model", str(tiny_model))
    line = proc.stdout.strip()
    assert line.startswith(f"{png}: {label}") and f"P(PNEUMONIA)={p:.4f}" in line
    assert f"NORMAL {1 - p:.1%}" in line and f"PNEUMONIA {p:.1%}" in line
    assert "threshold 0.4000" in line

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert offline.main(["predict", str(png), str(text), "--model", str(tiny_model)]) == 1
    assert offline.main(["predict", str(tmp_path / "missing.png"), "--model", str(tiny_model)]) == 2


def test_predict_offline_json(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image = (np.random.default_rng(5).random((40, 40)) * 255).astype(np.uint8)
    path = tmp_path / "one.npy"
    np.save(path, image)
    assert offline.main(["predict", str(path), "--model", str(tiny_model), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    prediction = Prediction.model_validate({k: v for k, v in answer.items() if k not in ("file", "status")})
    assert answer["status"] == 200 and prediction.model == "tiny"
    assert prediction.probability == pytest.approx(expected_probability(path.read_bytes()), abs=1e-6)


def test_evaluate_offline_on_a_labelled_folder(tiny_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    data = tmp_path / "my_images"
    bodies = {}
    for label, folder in enumerate(("Normal", "pneumonia")):
        (data / folder).mkdir(parents=True)
        for i in range(3 + label):
            path = data / folder / f"{i}.png"
            Image.fromarray((rng.random((50, 50)) * 255).astype(np.uint8)).save(path)
            bodies[f"{folder}/{i}.png"] = path.read_bytes()
    out = tmp_path / "report"
    assert offline.main(["evaluate", "--model", str(tiny_model), "--data-dir", str(data), "--out-dir", str(out)]) == 0
    report = json.loads((out / "evaluate.json").read_text())
    got = {p["file"]: (p["label"], p["probability"]) for p in report["predictions"]}
    assert sorted(got) == sorted(bodies)
    for name, body in bodies.items():
        assert got[name][0] == int(name.startswith("pneumonia"))
        assert got[name][1] == pytest.approx(expected_probability(body), abs=1e-6)
    # a labelled folder is one evaluation set: asking it for a training split is an error
    assert offline.main(["evaluate", "--model", str(tiny_model), "--data-dir", str(data), "--split", "train",
                         "--out-dir", str(out)]) == 2


def test_evaluate_offline_on_a_medmnist_npz(tiny_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (6, 64, 64), dtype=np.uint8)  # MedMNIST+ 64 px (28 px is under MIN_SIDE)
    labels = np.array([[0], [1], [1], [0], [1], [1]], np.uint8)
    npz = tmp_path / "pneumoniamnist_64.npz"
    np.savez(npz, test_images=images, test_labels=labels, train_images=images[:1], train_labels=labels[:1])
    out = tmp_path / "report"
    assert offline.main(["evaluate", "--model", str(tiny_model), "--data-dir", str(npz), "--out-dir", str(out)]) == 0
    report = json.loads((out / "evaluate.json").read_text())
    assert [p["file"] for p in report["predictions"]][:2] == ["test/NORMAL/00000", "test/PNEUMONIA/00001"]
    assert [p["label"] for p in report["predictions"]] == labels.ravel().tolist()
    np.testing.assert_allclose([p["probability"] for p in report["predictions"]],
                               [expected_probability(npy_bytes(a)) for a in images], atol=1e-6)


def test_offline_refuses_missing_models_and_data(tiny_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "junk").mkdir()
    assert offline.main(["evaluate", "--model", str(tmp_path / "none.onnx"), "--data-dir", str(tmp_path)]) == 2
    assert "no model file" in capsys.readouterr().err
    assert offline.main(["evaluate", "--model", str(tiny_model), "--data-dir", str(tmp_path / "junk")]) == 2
    assert "not a data folder" in capsys.readouterr().err
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"\0" * 10)
    assert offline.main(["predict", str(bogus), "--model", str(bogus)]) == 2
    assert "expected a .mar" in capsys.readouterr().err


# --- offline == served ---------------------------------------------------------------------------

@pytest.mark.server
@pytest.mark.slow
def test_offline_answers_equal_the_served_ones(server: ServeSettings, model_store: Path, data_dir: Path,
                                               sample_jpeg: bytes) -> None:
    from tests.test_dicom import make_dicom

    gray = np.asarray(Image.open(io.BytesIO(sample_jpeg)).convert("L"))
    items = [(name, body.read_bytes() if isinstance(body, Path) else body, "application/octet-stream")
             for name, body, _ in stratified(list_items(data_dir, "test"), 30)]
    items += [(c.name, c.body, c.content_type) for c in cases(sample_jpeg)]
    items += [("dicom", make_dicom(gray), "application/dicom"), ("dicom_ct", make_dicom(gray, modality="CT"),
                                                                 "application/dicom")]
    token = keys(server)["inference"]
    with httpx.Client(timeout=60) as http:
        served = [http.post(f"{server.inference_url}/predictions/xray", content=body,
                            headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
                  for _, body, ctype in items]
    with InProcessWorker.open(model_store / "xray.mar") as worker:
        answers = worker.predict_many(items)  # each with the Content-Type the live request had
    assert sum(r.status_code == 200 for r in served) >= 30
    for (name, _, _), live, off in zip(items, served, answers, strict=True):
        assert off.status == live.status_code, name
        if live.status_code == 200:
            a, b = Prediction.model_validate(live.json()), off.prediction
            assert b is not None and (a.label, a.threshold, a.model, a.version, a.backend) == (
                b.label, b.threshold, b.model, b.version, b.backend), name
            assert abs(a.probability - b.probability) <= 1e-6, name
        else:
            assert off.error is not None and ErrorBody.model_validate(live.json()) == off.error.error, name


@pytest.mark.slow
def test_evaluate_offline_from_a_checkpoint_matches_the_export(best_dir: Path, export_dir: Path, data_dir: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    family, entry = sorted(json.loads((best_dir / "summary.json").read_text())["models"].items())[0]
    out = tmp_path / "report"
    assert offline.main(["evaluate", "--model", str(best_dir / entry["checkpoint"]), "--data-dir", str(data_dir),
                         "--limit", "24", "--out-dir", str(out),
                         "--expect", str(export_dir / f"predictions_{family}.json")]) == 0
    assert "in process vs export" in capsys.readouterr().out
    report = json.loads((out / "evaluate.json").read_text())
    assert report["expect"]["compared"] >= 20 and not report["expect"]["mismatches"]
