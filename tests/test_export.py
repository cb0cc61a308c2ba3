"""Export: TorchScript + ONNX files, their cards, batch-size parity on real images, bad files.

Uses the session pipeline fixtures (best_dir -> export_dir, CI-sized quick models).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from export import parity
from export.__main__ import main as export_main
from export.__main__ import read_summary
from export.onnx_export import OPSET
from handlers.backends import (
    CARD_KEY,
    INPUT_NAME,
    OOD_OUTPUT,
    OUTPUT_NAME,
    ModelFileError,
    OnnxRunner,
    TorchScriptRunner,
    load_runner,
    pneumonia_probability,
)
from handlers.constants import REPO_ROOT as REPO
from handlers.schemas import ModelCard
from training.checkpoint import load_checkpoint
from training.sources import list_image_folder

STAMPED = {"checkpoint_sha256", "versions"}  # what export adds to the checkpoint's card


@pytest.fixture(scope="module")
def checkpoints(best_dir: Path) -> dict[str, Path]:
    found = read_summary(best_dir)
    assert found, "the best dir lists no models"
    return found


@pytest.fixture(scope="module")
def images(data_dir: Path) -> parity.Images:
    return parity.load_images(data_dir, "test", parity.MIN_IMAGES)


def spread(images: parity.Images, n: int) -> parity.Images:
    """n images evenly spread over the sorted split (so both classes appear)."""
    idx = np.linspace(0, len(images.names) - 1, n).round().astype(int)
    return parity.Images([images.names[i] for i in idx], [images.grays[i] for i in idx], images.labels[idx])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_both_formats_written_single_file_onnx_valid(export_dir: Path, checkpoints: dict[str, Path]) -> None:
    assert not list(export_dir.rglob("*.data")), "ONNX must be one file, without an .onnx.data side file"
    assert not list(export_dir.glob("*.tmp"))
    for family in checkpoints:
        onnx_path = export_dir / f"{family}.onnx"
        assert (export_dir / f"{family}.torchscript.pt").is_file()
        onnx.checker.check_model(str(onnx_path), full_check=True)
        proto = onnx.load(str(onnx_path))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
        [inp], outs = proto.graph.input, proto.graph.output
        # logits, and the OOD score of the detector inside the graph, both with the dynamic batch axis
        assert (inp.name, [o.name for o in outs]) == (INPUT_NAME, [OUTPUT_NAME, OOD_OUTPUT])
        assert all(o.type.tensor_type.shape.dim[0].dim_param for o in outs)
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = inp.type.tensor_type.shape.dim
        card, _, _ = load_checkpoint(checkpoints[family])
        assert dims[0].dim_param and not dims[0].HasField("dim_value"), "the batch axis must be dynamic"
        assert [d.dim_value for d in dims[1:]] == [1, card.input_size, card.input_size]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript.pt"])
def test_card_read_back_equals_checkpoint_card(export_dir: Path, checkpoints: dict[str, Path], fmt: str) -> None:
    for family, ckpt in checkpoints.items():
        card, _, raw = load_checkpoint(ckpt)
        read = load_runner(export_dir / f"{family}.{fmt}").card
        assert read.model_dump(exclude=STAMPED) == card.model_dump(exclude=STAMPED)
        assert read.model_dump(exclude=STAMPED) == ModelCard.model_validate(raw["card"]).model_dump(exclude=STAMPED)
        assert read.threshold == card.threshold  # tuned on validation by training, kept as is
        assert read.checkpoint_sha256 == sha256(ckpt)
        assert read.versions["torch"] == torch.__version__
        assert read.versions["onnx"] == onnx.__version__
        assert read.versions["onnxruntime"] == onnxruntime.__version__


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batch_sizes_agree_across_formats(export_dir: Path, checkpoints: dict[str, Path],
                                          images: parity.Images, batch: int) -> None:
    for family, ckpt in checkpoints.items():
        card, model, _ = load_checkpoint(ckpt)
        ts = TorchScriptRunner(export_dir / f"{family}.torchscript.pt")
        ox = OnnxRunner(export_dir / f"{family}.onnx")
        chosen = spread(images, batch)
        x = parity.model_inputs(chosen, card, 0, batch)
        assert x.shape == (batch, 1, card.input_size, card.input_size) and x.dtype == np.float32
        logits = {"eager": parity.eager_logits(model, x), "torchscript": ts(x), "onnx": ox(x)}
        for name, out in logits.items():
            assert out.shape == (batch, card.n_outputs), name
        probs = {k: pneumonia_probability(v, card.head) for k, v in logits.items()}
        for name in ("torchscript", "onnx"):
            np.testing.assert_allclose(probs[name], probs["eager"], rtol=0, atol=parity.TOLERANCE,
                                       err_msg=f"{family} {name} batch {batch}")
            assert np.array_equal(probs[name] >= card.threshold, probs["eager"] >= card.threshold)
        # a batch's answer does not depend on its batch-mates: image by image gives the same
        alone = np.concatenate([ox(x[i : i + 1]) for i in range(batch)])
        np.testing.assert_allclose(pneumonia_probability(alone, card.head), probs["onnx"], rtol=0, atol=1e-6)


def test_parity_report_passed_on_enough_real_images(export_dir: Path, checkpoints: dict[str, Path],
                                                    data_dir: Path) -> None:
    report = json.loads((export_dir / "parity.json").read_text())
    n_test = len(list_image_folder(data_dir, "test"))
    assert report["passed"] is True
    assert set(report["models"]) == set(checkpoints)
    for family, r in report["models"].items():
        assert r["passed"] is True and r["labels_identical"] is True, family
        assert r["n_images"] >= min(parity.MIN_IMAGES, n_test)
        for runtime in ("torchscript", "onnx"):
            assert 0 <= r[f"max_abs_diff_{runtime}"] <= parity.TOLERANCE, (family, runtime)
        assert r["checkpoint_sha256"] == sha256(checkpoints[family])
        m = r["test_metrics"]
        assert m["n"] == r["n_images"] and m["tp"] + m["tn"] + m["fp"] + m["fn"] == r["n_images"]
        assert m["accuracy"] == pytest.approx((m["tp"] + m["tn"]) / m["n"])


def test_predictions_file_matches_report(export_dir: Path, checkpoints: dict[str, Path], data_dir: Path) -> None:
    report = json.loads((export_dir / "parity.json").read_text())["models"]
    for family in checkpoints:
        preds = json.loads((export_dir / f"predictions_{family}.json").read_text())
        card = load_runner(export_dir / f"{family}.onnx").card
        assert preds["model"] == family and preds["threshold"] == card.threshold
        rows = preds["predictions"]
        assert len(rows) == report[family]["n_images"]
        for row in rows[:: max(1, len(rows) // 50)]:
            path = data_dir / row["file"]
            assert path.is_file() and row["file"].startswith("test/")
            assert row["label"] == card.class_names.index(path.parent.name)
        prob = np.array([r["probability"] for r in rows])
        assert ((prob >= 0) & (prob <= 1)).all()
        assert [r["predicted"] for r in rows] == [card.class_names[int(p >= card.threshold)] for p in prob]
        accuracy = np.mean([card.class_names.index(r["predicted"]) == r["label"] for r in rows])
        assert accuracy == pytest.approx(report[family]["test_metrics"]["accuracy"])


def test_compare_flags_drift_and_label_flips() -> None:
    eager = np.array([0.1, 0.499999, 0.9])
    ok = parity.compare({"eager": eager, "torchscript": eager.copy(), "onnx": eager + 5e-6}, 0.3)
    assert ok["passed"] and ok["labels_identical"] and ok["max_abs_diff_onnx"] == pytest.approx(5e-6)
    drift = parity.compare({"eager": eager, "torchscript": eager + 2 * parity.TOLERANCE, "onnx": eager}, 0.2)
    assert not drift["passed"] and drift["labels_identical"]
    flip = parity.compare({"eager": eager, "torchscript": eager, "onnx": eager + 2e-6}, 0.5)
    assert not flip["passed"] and not flip["labels_identical"] and flip["label_mismatches"] == 1
    nan = parity.compare({"eager": eager, "torchscript": eager, "onnx": np.array([0.1, np.nan, 0.9])}, 0.95)
    assert not nan["passed"]


# --- bad model files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xraynet_files(export_dir: Path, checkpoints: dict[str, Path]) -> tuple[Path, Path]:
    family = "xraynet" if "xraynet" in checkpoints else next(iter(checkpoints))
    return export_dir / f"{family}.onnx", export_dir / f"{family}.torchscript.pt"


def test_missing_file(tmp_path: Path) -> None:
    for name in ("nothing.onnx", "nothing.torchscript.pt"):
        with pytest.raises(ModelFileError, match="not found"):
            load_runner(tmp_path / name)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_files_are_refused(tmp_path: Path, xraynet_files: tuple[Path, Path], damage: str) -> None:
    for src, what in zip(xraynet_files, ("ONNX", "TorchScript"), strict=True):
        data = src.read_bytes()
        bad = data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096)
        path = tmp_path / f"bad_{src.name}"
        path.write_bytes(bad)
        with pytest.raises(ModelFileError, match=f"not a loadable {what} model"):
            load_runner(path)


def _onnx_with_card(src: Path, dst: Path, card_json: str | None) -> Path:
    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    if card_json is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = CARD_KEY, card_json
    onnx.save(proto, str(dst))
    return dst


def test_onnx_without_or_with_a_wrong_card(tmp_path: Path, xraynet_files: tuple[Path, Path]) -> None:
    src = xraynet_files[0]
    card = load_runner(src).card
    with pytest.raises(ModelFileError, match=f"carries no '{CARD_KEY}' metadata"):
        OnnxRunner(_onnx_with_card(src, tmp_path / "nocard.onnx", None))
    with pytest.raises(ModelFileError, match="metadata is invalid"):
        OnnxRunner(_onnx_with_card(src, tmp_path / "badjson.onnx", "{not json"))
    other_size = card.model_copy(update={"input_size": card.input_size + 32}).model_dump_json()
    with pytest.raises(ModelFileError, match="does not match card input_size"):
        OnnxRunner(_onnx_with_card(src, tmp_path / "size.onnx", other_size))


def test_torchscript_without_card(tmp_path: Path, xraynet_files: tuple[Path, Path]) -> None:
    module = torch.jit.load(str(xraynet_files[1]))
    torch.jit.save(module, str(tmp_path / "nocard.pt"))
    with pytest.raises(ModelFileError, match=f"carries no '{CARD_KEY}' metadata"):
        TorchScriptRunner(tmp_path / "nocard.pt")


# --- the CLI's failures ----------------------------------------------------------------------

def test_cli_missing_best_dir(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "export", "--best-dir", str(tmp_path / "none"),
                           "--out-dir", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "summary.json" in proc.stderr and "make train" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_parity_failure_exits_nonzero(tmp_path: Path, best_dir: Path, checkpoints: dict[str, Path],
                                      data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    family = min(checkpoints, key=lambda f: checkpoints[f].stat().st_size)
    best = tmp_path / "best"
    best.mkdir()
    (best / "one.pt").symlink_to(checkpoints[family])
    (best / "summary.json").write_text(json.dumps({"models": {family: {"checkpoint": "one.pt"}}}))
    monkeypatch.setattr(parity, "TOLERANCE", -1.0)  # nothing can pass: proves the exit path, not a mock
    out = tmp_path / "export"
    rc = export_main(["--best-dir", str(best), "--out-dir", str(out), "--data-dir", str(data_dir),
                      "--parity-images", "10"])
    assert rc == 1
    assert "PARITY FAILED" in capsys.readouterr().err
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is False and report["models"][family]["passed"] is False
    n_test = len(list_image_folder(data_dir, "test"))
    assert report["models"][family]["n_images"] == min(parity.MIN_IMAGES, n_test)  # 10 is raised to 256


def test_export_and_serving_do_not_import_the_training_loop() -> None:
    # export needs checkpoints and models, serving needs the torch-free data/metrics helpers; neither
    # may drag in the training loop (and the CLIs that import each other stay apart)
    code = ("import sys, export.__main__, export.archive, serving.bench, serving.soak, serving.evaluate\n"
            "print(sorted(m for m in ('training.train', 'training.experiments') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
