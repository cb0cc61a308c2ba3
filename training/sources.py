"""Where images come from: the ImageFolder tree, the course's .npy arrays, MedMNIST .npz.

Torch-free, so the client can list and read a split too. Every source yields float32
[0, 1] grayscale images through handlers.preprocess and labels 0 = NORMAL, 1 = PNEUMONIA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from handlers import preprocess
from handlers.constants import DATA_DIR
from handlers.schemas import CLASS_NAMES

SPLITS = ("train", "val", "test")
MIN_DATASET_SIDE = 8  # MedMNIST's classic images are 28x28; requests keep preprocess.MIN_SIDE
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def default_data_dir() -> Path:
    """DATA_DIR from the environment, else ../shared/data/chest_xray beside the repository."""
    return Path(os.environ.get("DATA_DIR", DATA_DIR))


def stratified_subset(labels: np.ndarray | list[int], n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of about n items with each class in its share, by
    scikit-learn's train_test_split(stratify=); all indices when n covers everything."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    # stratify needs two members of each class in the sample; a tiny n or class gets a plain sample
    counts = np.bincount(labels)
    stratify = labels if n >= len(counts[counts > 0]) and counts[counts > 0].min() >= 2 else None
    keep, _ = train_test_split(np.arange(len(labels)), train_size=n, random_state=seed, stratify=stratify)
    return np.sort(keep)


def list_image_folder(data_dir: Path, split: str) -> list[tuple[Path, int]]:
    """SPLIT/NORMAL/*, SPLIT/PNEUMONIA/* -> sorted (path, label) pairs."""
    root = Path(data_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"no '{split}' split at {root} (set DATA_DIR to an ImageFolder tree)")
    items = [
        (path, label)
        for label, name in enumerate(CLASS_NAMES)
        for path in sorted((root / name).glob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise FileNotFoundError(f"no images under {root}/{{{','.join(CLASS_NAMES)}}}")
    return items


def find_npy_split(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    """The course's per-class arrays: x_test_normal.npy / x_test_pneumonia.npy or test_normal.npy / ..."""
    for prefix in (f"x_{split}_", f"{split}_"):
        normal, pneu = (Path(data_dir) / f"{prefix}{c.lower()}.npy" for c in CLASS_NAMES)
        if normal.is_file() and pneu.is_file():
            return normal, pneu
    return None


def load_npy_split(data_dir: Path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    found = find_npy_split(data_dir, split)
    if found is None:
        raise FileNotFoundError(f"no {split}_normal.npy / {split}_pneumonia.npy (or x_ prefixed) in {data_dir}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, path in enumerate(found):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 2:  # a single image
            arr = arr[None]
        images += [preprocess.gray_from_array(a, MIN_DATASET_SIDE) for a in arr]
        labels += [label] * len(arr)
    return images, np.asarray(labels, dtype=np.int64)


def load_medmnist(npz_path: Path, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """MedMNIST's PneumoniaMNIST layout: {split}_images (N, H, W[, C]) uint8, {split}_labels (N, 1)."""
    with np.load(npz_path, allow_pickle=False) as z:
        key = {"train": "train", "val": "val", "test": "test"}[split]
        arr, labels = z[f"{key}_images"], z[f"{key}_labels"].reshape(-1).astype(np.int64)
    if arr.ndim == 4:  # colour MedMNIST sets: luma, as for RGB files
        arr = (arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return [preprocess.gray_from_array(a, MIN_DATASET_SIDE) for a in arr], labels


def detect_format(data_dir: Path) -> str:
    """'imagefolder', 'npy' or 'medmnist' (a .npz file given as DATA_DIR)."""
    data_dir = Path(data_dir)
    if data_dir.is_file() and data_dir.suffix == ".npz":
        return "medmnist"
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        return "imagefolder"
    if any(find_npy_split(data_dir, s) for s in SPLITS):
        return "npy"
    raise FileNotFoundError(
        f"{data_dir}: not an ImageFolder tree, a folder of course .npy files, or a MedMNIST .npz"
    )


def iter_split(data_dir: Path, split: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """(name, float32 [0,1] gray image, label) for every image of a split, in a stable order."""
    fmt = detect_format(data_dir)
    if fmt == "imagefolder":
        for path, label in list_image_folder(data_dir, split):
            yield str(path.relative_to(data_dir)), preprocess.decode(path.read_bytes()), label
        return
    images, labels = load_npy_split(data_dir, split) if fmt == "npy" else load_medmnist(data_dir, split)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield f"{split}/{CLASS_NAMES[label]}/{i:05d}", image, int(label)
