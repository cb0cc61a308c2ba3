"""An out-of-distribution evaluation set made by code: images that are not chest radiographs.

Nothing is downloaded and nothing is committed: every image is either a file that an installed
package ships (scikit-image's bundled sample images, nibabel's bundled test MRI volumes) or is
drawn here (matplotlib charts and text pages, noise, flat fields, gradients, textures), seeded.
Also the *border cases*, made from real radiographs: what users really send that is neither
clearly a chest radiograph nor clearly something else (rotated, inverted, one lung, 64 px, a
screenshot with a viewer's frame). They are reported apart: no floor applies to them.

Every image is a float32 grayscale HxW array in [0, 1], the form handlers.preprocess.decode
returns, so the offline check (`to_model_input`) and the live one (`encode_png` then POST) see
the same pixels. Torch-free: the client and `make ood` use it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 256  # generated images; bundled ones keep their own size (all >= 32 px after the upscales below)


@dataclass(frozen=True)
class OodImage:
    name: str
    kind: str  # photo, texture, document, chart, medical, noise, flat, gradient; border cases: border
    gray: np.ndarray  # float32 HxW in [0, 1]


def to_gray(img: Image.Image) -> np.ndarray:
    """Any PIL image -> float32 luma in [0, 1] (the conversion handlers.preprocess applies to colour)."""
    if img.mode in ("I;16", "I;16B", "I"):
        a = np.asarray(img, dtype=np.float32)
        return np.clip(a / 65535.0, 0, 1)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _fit(gray: np.ndarray, min_side: int = 96) -> np.ndarray:
    """Upscale small images (bundled MRI slices are 20-60 px) so every image passes the size check."""
    h, w = gray.shape
    if min(h, w) >= min_side:
        return gray.astype(np.float32)
    k = min_side / min(h, w)
    img = Image.fromarray(gray.astype(np.float32), mode="F").resize((round(w * k), round(h * k)), Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)


def _stretch(a: np.ndarray) -> np.ndarray:
    """Robust window (1st-99th percentile) to [0, 1], as a viewer would show a volume slice."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1).astype(np.float32)


# --- bundled with installed packages -----------------------------------------------------------

SKIMAGE_KINDS = {  # file stem -> kind; everything else there is a photograph
    "brick": "texture", "grass": "texture", "gravel": "texture", "chessboard_GRAY": "texture",
    "chessboard_RGB": "texture", "page": "document", "text": "document", "logo": "chart", "color": "chart",
    "cell": "medical", "ihc": "medical", "microaneurysms": "medical", "retina": "medical", "phantom": "medical",
}


def skimage_images(crops: int = 2, seed: int = 0) -> Iterator[OodImage]:
    """Every PNG/JPEG that scikit-image ships in skimage/data (read from disk: its fetchers could
    try to download the rest), whole and as `crops` random crops of half the side."""
    import skimage.data

    rng = np.random.default_rng(seed)
    folder = Path(skimage.data.__file__).parent
    for path in sorted([*folder.glob("*.png"), *folder.glob("*.jpg")]):
        with Image.open(path) as img:
            gray = to_gray(img)
        kind = SKIMAGE_KINDS.get(path.stem, "photo")
        yield OodImage(f"skimage/{path.stem}", kind, _fit(gray))
        h, w = gray.shape
        for c in range(crops):
            ch, cw = max(h // 2, 32), max(w // 2, 32)
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            yield OodImage(f"skimage/{path.stem}/crop{c}", kind, _fit(gray[y : y + ch, x : x + cw]))
    faces = np.load(folder / "lfw_subset.npy", allow_pickle=False)  # 200 faces, 25x25
    for i in range(0, len(faces), 20):
        yield OodImage(f"skimage/lfw_face{i}", "photo", _fit(np.clip(faces[i], 0, 1)))


NIBABEL_VOLUMES = ("example4d.nii.gz", "anatomical.nii", "example4d+orig.HEAD", "scaled+tlrc.HEAD",
                   "phantom_EPI_asc_CLEAR_2_1.PAR", "reoriented_anat_moved.nii", "example_nifti2.nii.gz")


def nibabel_slices(per_axis: int = 2) -> Iterator[OodImage]:
    """Slices of the MRI volumes that nibabel ships as test data, along each axis wide enough."""
    import nibabel

    folder = Path(nibabel.__file__).parent / "tests" / "data"
    for fname in NIBABEL_VOLUMES:
        vol = np.asanyarray(nibabel.load(folder / fname).dataobj, dtype=np.float64)
        while vol.ndim > 3:
            vol = vol[..., 0]
        for axis in range(3):
            other = [s for a, s in enumerate(vol.shape) if a != axis]
            if min(other) < 16:
                continue
            for j in np.linspace(0.35, 0.65, per_axis):
                k = int(j * (vol.shape[axis] - 1))
                sl = np.take(vol, k, axis=axis)
                if np.ptp(sl) == 0:
                    continue
                yield OodImage(f"nibabel/{fname}/ax{axis}_{k}", "medical", _fit(np.rot90(_stretch(sl))))


# --- drawn here -------------------------------------------------------------------------------

def _render(draw: Callable, seed: int) -> np.ndarray:
    # An Agg canvas of its own: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=64)
    canvas = FigureCanvasAgg(fig)
    draw(fig, np.random.default_rng(seed))
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return to_gray(Image.fromarray(rgba[..., :3]))


def _line(fig, rng):
    ax = fig.add_subplot()
    for _ in range(3):
        ax.plot(np.cumsum(rng.normal(size=100)))
    ax.set_title("weekly admissions"), ax.set_xlabel("day"), ax.grid(True)


def _bar(fig, rng):
    fig.add_subplot().bar(list("ABCDEFG"), rng.uniform(1, 10, 7), color="gray")


def _scatter(fig, rng):
    fig.add_subplot().scatter(rng.normal(size=300), rng.normal(size=300), s=6)


def _pie(fig, rng):
    fig.add_subplot().pie(rng.uniform(1, 5, 5), labels=list("abcde"))


def _hist(fig, rng):
    fig.add_subplot().hist(rng.gamma(2, size=2000), bins=40)


def _heatmap(fig, rng):
    ax = fig.add_subplot()
    ax.imshow(rng.normal(size=(12, 12)).cumsum(0), cmap="viridis")


WORDS = ("patient", "report", "chest", "the", "findings", "of", "no", "acute", "lung", "normal", "heart",
         "size", "within", "limits", "impression", "clinical", "history", "cough", "fever", "and", "with")


def _page(fig, rng):
    for row in range(22):
        line = " ".join(rng.choice(WORDS, size=rng.integers(4, 9)))
        fig.text(0.04, 0.95 - row * 0.043, line, fontsize=rng.choice([7, 8, 9]), family="serif")


def _table(fig, rng):
    ax = fig.add_subplot()
    ax.axis("off")
    ax.table(cellText=np.round(rng.uniform(0, 100, (12, 4)), 1).astype(str), colLabels=list("WXYZ"), loc="center")


CHARTS = {"line": _line, "bar": _bar, "scatter": _scatter, "pie": _pie, "histogram": _hist, "heatmap": _heatmap}


def rendered(n_each: int = 2, seed: int = 0) -> Iterator[OodImage]:
    """Charts, text pages and tables drawn with matplotlib."""
    for i in range(n_each):
        for name, draw in CHARTS.items():
            yield OodImage(f"matplotlib/{name}{i}", "chart", _render(draw, seed + i))
        yield OodImage(f"matplotlib/page{i}", "document", _render(_page, seed + i))
        yield OodImage(f"matplotlib/table{i}", "document", _render(_table, seed + i))


def _smooth(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise: a random cells x cells grid upsampled bicubically to SIDE."""
    small = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((SIDE, SIDE), Image.BICUBIC)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)


def synthetic(seed: int = 0) -> Iterator[OodImage]:
    """Noise, flat fields, gradients and textures."""
    rng = np.random.default_rng(seed)
    s = SIDE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
    for i in range(3):
        yield OodImage(f"noise/uniform{i}", "noise", rng.uniform(0, 1, (s, s)).astype(np.float32))
        yield OodImage(f"noise/gaussian{i}", "noise", np.clip(rng.normal(0.5, 0.2, (s, s)), 0, 1).astype(np.float32))
        yield OodImage(f"noise/salt_pepper{i}", "noise", (rng.uniform(size=(s, s)) < 0.5).astype(np.float32))
    for cells in (4, 8, 16, 32):
        yield OodImage(f"noise/value{cells}", "noise", _smooth(rng, cells))
    for level in (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0):
        yield OodImage(f"flat/{level:.1f}", "flat", np.full((s, s), level, np.float32))
    r = np.hypot(yy - 0.5, xx - 0.5) / np.sqrt(0.5)
    for name, g in {"horizontal": xx, "vertical": yy, "diagonal": (xx + yy) / 2, "radial": r,
                    "radial_inverse": 1 - r, "horizontal_inverse": 1 - xx}.items():
        yield OodImage(f"gradient/{name}", "gradient", np.clip(g, 0, 1).astype(np.float32))
    for period in (8, 32):
        checker = ((np.floor(yy * s / period) + np.floor(xx * s / period)) % 2).astype(np.float32)
        yield OodImage(f"texture/checker{period}", "texture", checker)
        yield OodImage(f"texture/stripes{period}", "texture", ((xx * s // period) % 2).astype(np.float32))
        yield OodImage(f"texture/grating{period}", "texture",
                       (0.5 + 0.5 * np.sin(2 * np.pi * (xx + 0.5 * yy) * s / period)).astype(np.float32))
    import skimage.data

    for frac in (0.1, 0.5):
        blobs = skimage.data.binary_blobs(length=s, blob_size_fraction=frac, rng=seed)
        yield OodImage(f"texture/blobs{frac}", "texture", blobs.astype(np.float32))


def ood_set(seed: int = 0) -> list[OodImage]:
    """The whole evaluation set of non-radiographs (~200 images, deterministic for a seed)."""
    return [*skimage_images(seed=seed), *nibabel_slices(), *rendered(seed=seed), *synthetic(seed=seed)]


# --- border cases, from real radiographs -------------------------------------------------------

def _resize(gray: np.ndarray, w: int, h: int) -> np.ndarray:
    img = Image.fromarray(gray.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0, 1)


def screenshot(gray: np.ndarray) -> np.ndarray:
    """The radiograph inside a dark viewer window: title bar, tool bar, side panel, text overlays."""
    from PIL import ImageDraw

    h, w = gray.shape
    scale = 512 / max(h, w)
    inner = _resize(gray, max(32, round(w * scale)), max(32, round(h * scale)))
    ih, iw = inner.shape
    canvas = Image.new("L", (iw + 200, ih + 90), 38)
    canvas.paste(Image.fromarray((inner * 255).astype(np.uint8)), (160, 60))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, canvas.width, 24), fill=210)  # title bar
    d.text((8, 6), "PACS Viewer - CHEST PA - 1 of 2", fill=20)
    d.rectangle((0, 24, canvas.width, 56), fill=70)  # tool bar
    for k in range(12):
        d.rectangle((8 + 34 * k, 30, 34 + 34 * k, 52), fill=150)
    d.rectangle((0, 56, 150, canvas.height), fill=55)  # series panel
    for k in range(4):
        d.rectangle((12, 70 + 90 * k, 138, 150 + 90 * k), fill=90 + 20 * k)
    d.text((170, 66), "W: 2048 L: 1024", fill=255)
    d.text((170, ih + 40), "Zoom 100%  Im: 1/1", fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


BORDER_CASES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotated_90": lambda g: np.ascontiguousarray(np.rot90(g)),
    "inverted": lambda g: 1.0 - g,
    "one_lung": lambda g: g[g.shape[0] // 6 : g.shape[0] * 5 // 6, g.shape[1] // 12 : g.shape[1] // 2],
    "downscaled_64": lambda g: _resize(g, 64, 64),
    "screenshot": screenshot,
}


def border_cases(grays: list[np.ndarray], names: list[str] | None = None) -> Iterator[OodImage]:
    """Each border case applied to each radiograph; kind = 'border/<case>'."""
    names = names or [str(i) for i in range(len(grays))]
    for case, fn in BORDER_CASES.items():
        for name, g in zip(names, grays, strict=True):
            yield OodImage(f"{case}/{name}", f"border/{case}", fn(g).astype(np.float32))


def encode_png(gray: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a [0, 1] image: what a live check POSTs."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
