"""Image sources (course .npy, MedMNIST .npz), metrics against hand counts, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import data as datalib
from training.metrics import binary_metrics, youden_threshold
from training.sources import detect_format, iter_split


def images(n: int, value: int, side: int = 40) -> np.ndarray:
    """n uint8 images, image i filled with value + i, so order and class can be checked."""
    return np.stack([np.full((side, side), value + i, np.uint8) for i in range(n)])


@pytest.mark.parametrize("prefix", ["x_test_", "test_"])
def test_course_npy_layout(tmp_path: Path, prefix: str) -> None:
    np.save(tmp_path / f"{prefix}normal.npy", images(3, 10))
    np.save(tmp_path / f"{prefix}pneumonia.npy", images(5, 200))
    assert detect_format(tmp_path) == "npy"
    items = list(iter_split(tmp_path, "test"))
    assert [label for _, _, label in items] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(img.shape == (40, 40) and img.dtype == np.float32 for _, img, _ in items)
    expected = [10, 11, 12, 200, 201, 202, 203, 204]
    assert [round(float(img[0, 0]) * 255) for _, img, _ in items] == expected
    assert items[0][0] == "test/NORMAL/00000" and items[-1][0] == "test/PNEUMONIA/00004"  # row 4 of its file
    with pytest.raises(FileNotFoundError):
        list(iter_split(tmp_path, "train"))


@pytest.mark.parametrize("side", [28, 64])  # classic PneumoniaMNIST and MedMNIST+
def test_medmnist_npz(tmp_path: Path, side: int) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 7), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    path = tmp_path / f"pneumoniamnist_{side}.npz"
    np.savez(path, **arrays)
    assert detect_format(path) == "medmnist"
    for split in ("train", "val", "test"):
        items = list(iter_split(path, split))
        assert [label for _, _, label in items] == arrays[f"{split}_labels"].ravel().tolist()
        for (_, img, _), raw in zip(items, arrays[f"{split}_images"], strict=True):
            assert img.shape == (side, side)
            np.testing.assert_allclose(img, raw / 255.0, atol=1e-6)


def test_binary_metrics_match_hand_counts() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.55, 0.45])
    m = binary_metrics(y, p, threshold=0.5)
    # predicted 1: indices 2, 4, 5, 7, 8 -> tp 4 (4, 5, 7, 8), fp 1 (2), fn 2 (6, 9), tn 3 (0, 1, 3)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 1, 2, 3)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(4 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    # AUC = P(score of a positive > score of a negative): count the 24 pairs by hand
    wins = sum((pp > pn) + 0.5 * (pp == pn) for pp in p[y == 1] for pn in p[y == 0])
    assert m["roc_auc"] == pytest.approx(wins / 24)
    strict = binary_metrics(y, p, threshold=0.75)
    assert (strict["tp"], strict["fp"]) == (2, 0)


def test_youden_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.35, 0.6, 0.9])  # separable, but not at 0.5
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.35
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] == m["specificity"] == 1.0
    assert binary_metrics(y, p, 0.5)["sensitivity"] < 1.0
    assert youden_threshold(np.ones(4), np.linspace(0, 1, 4)) == 0.5  # one class: no curve


def test_augment_shape_and_determinism() -> None:
    x = torch.randn(6, 1, 32, 32)
    a = datalib.augment(x, torch.Generator().manual_seed(1))
    b = datalib.augment(x, torch.Generator().manual_seed(1))
    c = datalib.augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
    assert torch.isfinite(a).all()


def write_images(folder: Path, values: list[int], suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(values):
        Image.fromarray(np.full((40, 40), v, np.uint8)).save(folder / f"img{i}{suffix}")


def test_labelled_folder_without_splits(tmp_path: Path) -> None:
    write_images(tmp_path / "normal", [10, 11])  # any case
    write_images(tmp_path / "Pneumonia", [200])
    write_images(tmp_path / "Pneumonia" / "patient7", [201], ".jpeg")  # nested folders count too
    (tmp_path / "Pneumonia" / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "labelled"
    items = list(iter_split(tmp_path, "test"))
    assert [label for _, _, label in items] == [0, 0, 1, 1]
    assert [name for name, _, _ in items][:3] == ["normal/img0.png", "normal/img1.png", "Pneumonia/img0.png"]
    assert [round(float(img[0, 0]) * 255) for _, img, _ in items][:3] == [10, 11, 200]
    with pytest.raises(FileNotFoundError, match="training needs"):  # never trained on by accident
        list(iter_split(tmp_path, "train"))


def test_imagefolder_class_names_any_case(tmp_path: Path) -> None:
    write_images(tmp_path / "test" / "Normal", [5])
    write_images(tmp_path / "test" / "PNEUMONIA", [250, 251])
    assert detect_format(tmp_path) == "imagefolder"
    assert [label for _, _, label in iter_split(tmp_path, "test")] == [0, 1, 1]


def test_a_folder_that_is_neither_is_refused_clearly(tmp_path: Path) -> None:
    write_images(tmp_path / "cats", [1])
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        detect_format(tmp_path)
    message = str(info.value)
    assert "NORMAL/" in message and "x_test_normal.npy" in message and "cats/, readme.txt" in message
    with pytest.raises(FileNotFoundError, match="no such folder"):
        detect_format(tmp_path / "missing")
    write_images(tmp_path / "NORMAL", [1])
    write_images(tmp_path / "normal", [2])
    with pytest.raises(FileNotFoundError, match="both"):
        detect_format(tmp_path)
