"""Splits as in-memory tensors, and training-time augmentation.

Each image is decoded and resized once by handlers.preprocess (the serving path) and
cached on disk per (data set, split, size); normalisation uses the train split's mean/std.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handlers import preprocess
from handlers.constants import CACHE_DIR
from training.sources import detect_format, iter_split, list_image_folder, stratified_subset

CACHE_VERSION = "2"  # bump when handlers.preprocess changes what it produces


@dataclass
class Split:
    x: torch.Tensor  # [N, 1, S, S] float32, [0, 1] until normalised
    y: torch.Tensor  # [N] int64
    names: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int, seed: int = 0) -> Split:
        """A class-stratified, seeded subset of n images (for quick runs and tests)."""
        if n >= len(self):
            return self
        keep = torch.from_numpy(stratified_subset(self.y.numpy(), n, seed))
        return Split(self.x[keep], self.y[keep], [self.names[i] for i in keep.tolist()])


def _cache_key(data_dir: Path, split: str, size: int) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{Path(data_dir).resolve()}|{split}|{size}".encode())
    if detect_format(data_dir) == "imagefolder":
        for path, label in list_image_folder(data_dir, split):
            st = path.stat()
            h.update(f"{path.name}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_split(data_dir: Path, split: str, size: int, cache: bool = True) -> Split:
    """Decode + resize every image of a split with the serving preprocessing, cached on disk."""
    path = CACHE_DIR / f"{split}_{size}_{_cache_key(data_dir, split, size)}.pt"
    if cache and path.is_file():
        blob = torch.load(path, weights_only=True)
        return Split(blob["x"], blob["y"], list(blob["names"]))
    names, xs, ys = [], [], []
    bar = tqdm(iter_split(data_dir, split), desc=f"decode {split}@{size}", leave=False, disable=None)
    for name, gray, label in bar:
        names.append(name)
        xs.append(preprocess.resize(gray, size))
        ys.append(label)
    out = Split(torch.from_numpy(np.stack(xs)[:, None]), torch.tensor(ys, dtype=torch.int64), names)
    if cache:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"x": out.x, "y": out.y, "names": names}, tmp)
        tmp.replace(path)
    return out


def norm_stats(x: torch.Tensor) -> tuple[float, float]:
    return round(float(x.mean()), 6), round(float(x.std()), 6)


def normalized(split: Split, mean: float, std: float) -> Split:
    """The same arithmetic as handlers.preprocess.normalize, applied to the whole split."""
    x = torch.from_numpy(preprocess.normalize(split.x.numpy(), mean, std))
    return Split(x, split.y, split.names)


def augment(x: torch.Tensor, g: torch.Generator, max_deg: float = 7.0, max_shift: float = 0.06,
            max_zoom: float = 0.08, max_gain: float = 0.1) -> torch.Tensor:
    """Small random rotation, shift, zoom and contrast/brightness on a normalised batch."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    angle = u(-max_deg, max_deg) * math.pi / 180
    scale = 1 + u(-max_zoom, max_zoom)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u(-max_shift, max_shift)], 1),
                         torch.stack([sin, cos, u(-max_shift, max_shift)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = (1 + u(-max_gain, max_gain)).view(n, 1, 1, 1)
    bias = u(-max_gain, max_gain).view(n, 1, 1, 1)
    return out * gain + bias
