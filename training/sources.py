"""Where images come from: an ImageFolder tree, a labelled folder, the course's .npy arrays, MedMNIST .npz.

    imagefolder  DATA_DIR/{train,val,test}/{NORMAL,PNEUMONIA}/...   (the shared data set)
    labelled     DATA_DIR/{NORMAL,PNEUMONIA}/...                      (no split level: one evaluation set)
    npy          DATA_DIR/x_test_normal.npy, x_test_pneumonia.npy     (or test_normal.npy, ...)
    medmnist     DATA_DIR = pneumoniamnist.npz

Class folders match case-insensitively and may hold subfolders (a folder per patient).

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
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm", ".dicom")
# A labelled folder has no split level: it is one set to evaluate on, never to train on.
LABELLED_SPLIT = "test"


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


def class_dirs(root: Path) -> dict[int, Path]:
    """{label: subfolder of root named after that class}, names matched case-insensitively."""
    found: dict[int, Path] = {}
    if not Path(root).is_dir():
        return found
    for sub in sorted(Path(root).iterdir()):
        if sub.is_dir() and sub.name.upper() in CLASS_NAMES:
            label = CLASS_NAMES.index(sub.name.upper())
            if label in found:
                raise FileNotFoundError(f"{root}: {found[label].name}/ and {sub.name}/ are both {CLASS_NAMES[label]}")
            found[label] = sub
    return found


def list_image_folder(data_dir: Path, split: str) -> list[tuple[Path, int]]:
    """Every image of a split -> sorted (path, label) pairs: SPLIT/{NORMAL,PNEUMONIA}/** of an
    ImageFolder tree, or {NORMAL,PNEUMONIA}/** of a labelled folder (its only split: 'test')."""
    data_dir = Path(data_dir)
    if detect_format(data_dir) == "labelled":
        if split != LABELLED_SPLIT:
            raise FileNotFoundError(
                f"{data_dir} is a labelled folder (class folders, no train/val/test level): one set to evaluate, "
                f"read as split '{LABELLED_SPLIT}'; training needs DATA_DIR with train/ and val/ splits")
        root = data_dir
    else:
        root = data_dir / split
        if not root.is_dir():
            raise FileNotFoundError(f"no '{split}' split at {root} (set DATA_DIR to an ImageFolder tree)")
    items = [
        (path, label)
        for label, folder in sorted(class_dirs(root).items())
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    ]
    if not items:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images under {root}/{{{','.join(CLASS_NAMES)}}}")
    return items


def find_npy_split(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    """The course's per-class arrays: x_test_normal.npy / x_test_pneumonia.npy or test_normal.npy / ..."""
    for prefix in (f"x_{split}_", f"{split}_"):
        normal, pneu = (Path(data_dir) / f"{prefix}{c.lower()}.npy" for c in CLASS_NAMES)
        if normal.is_file() and pneu.is_file():
            return normal, pneu
    return None


def iter_arrays(data_dir: Path, split: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """(name, stored array, label) for every image of the course's .npy pair or a MedMNIST .npz, as
    stored (the evaluators send each as a .npy body). The name gives its row in its file:
    SPLIT/PNEUMONIA/00006 is row 6 of x_SPLIT_pneumonia.npy, or row 6 of the .npz's SPLIT_images."""
    if detect_format(data_dir) == "npy":
        found = find_npy_split(data_dir, split)
        if found is None:
            raise FileNotFoundError(f"no {split}_normal.npy / {split}_pneumonia.npy (or x_ prefixed) in {data_dir}")
        for label, path in enumerate(found):
            arr = np.load(path, allow_pickle=False)
            for i, image in enumerate(arr[None] if arr.ndim == 2 else arr):  # 2-D: a single image
                yield f"{split}/{CLASS_NAMES[label]}/{i:05d}", image, label
        return
    # MedMNIST's PneumoniaMNIST layout: {split}_images (N, H, W[, C]) uint8, {split}_labels (N, 1).
    with np.load(data_dir, allow_pickle=False) as z:
        if f"{split}_images" not in z.files:
            raise FileNotFoundError(f"{data_dir}: no {split}_images array (has {', '.join(sorted(z.files))})")
        arr, labels = z[f"{split}_images"], z[f"{split}_labels"].reshape(-1).astype(np.int64)
    if arr.ndim == 4:  # colour MedMNIST sets: luma, as for RGB files
        arr = (arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    for i, (image, label) in enumerate(zip(arr, labels, strict=True)):
        yield f"{split}/{CLASS_NAMES[label]}/{i:05d}", image, int(label)


def detect_format(data_dir: Path) -> str:
    """'imagefolder', 'labelled', 'npy' or 'medmnist' (a .npz file given as DATA_DIR)."""
    data_dir = Path(data_dir)
    if data_dir.is_file() and data_dir.suffix == ".npz":
        return "medmnist"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder (nor a MedMNIST .npz file)")
    if any((data_dir / s).is_dir() for s in SPLITS):
        return "imagefolder"
    if any(find_npy_split(data_dir, s) for s in SPLITS):
        return "npy"
    if class_dirs(data_dir):
        return "labelled"
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in data_dir.iterdir() if not p.name.startswith("."))
    raise FileNotFoundError(
        f"{data_dir}: not a data folder. Expected split folders ({'/, '.join(SPLITS)}/) holding "
        f"{'/ and '.join(CLASS_NAMES)}/, class folders {'/ and '.join(CLASS_NAMES)}/ (any case), the course's "
        f"x_test_normal.npy and x_test_pneumonia.npy, or a MedMNIST .npz file; it holds: "
        f"{', '.join(held[:12]) or 'nothing'}{' ...' if len(held) > 12 else ''}"
    )


def iter_split(data_dir: Path, split: str) -> Iterator[tuple[str, np.ndarray, int]]:
    """(name, float32 [0,1] gray image, label) for every image of a split, in a stable order."""
    fmt = detect_format(data_dir)
    if fmt in ("imagefolder", "labelled"):
        for path, label in list_image_folder(data_dir, split):
            yield str(path.relative_to(data_dir)), preprocess.decode(path.read_bytes()), label
        return
    for name, image, label in iter_arrays(data_dir, split):
        yield name, preprocess.gray_from_array(image, MIN_DATASET_SIDE), label
