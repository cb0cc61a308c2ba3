"""The one preprocessing: request bytes or arrays -> validated, normalised grayscale input.

Training, the export parity check, the TorchServe handler and the client all call this
module, so a served image goes through exactly the steps a training image went through:

    decode(bytes) or gray_from_array(array) -> float32 HxW in [0, 1] (EXIF orientation applied)
    resize(gray, size)                      -> float32 size x size (bilinear)
    normalize(x, mean, std)                 -> float32, then [1, size, size] for the model

numpy and Pillow only (no torch), so the client can use it too. Bad input raises
PreprocessError, which carries the HTTP status and a machine-readable type.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Refused before any pixel is decoded: a 6000x6000 image is already larger than any
# radiograph we serve, and the header alone tells us (decompression bombs).
MAX_PIXELS = 36_000_000
MAX_SIDE = 12_000
MIN_SIDE = 32
ACCEPTED_FORMATS = ("PNG", "JPEG")
NPY_MAGIC = b"\x93NUMPY"
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"


class PreprocessError(ValueError):
    """Bad input: carries the HTTP status and a short type for the JSON error body."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message


def sniff(data: bytes) -> str:
    """The input's kind from its first bytes: 'npy', 'dicom', 'png', 'jpeg' or 'unknown'."""
    if data.startswith(NPY_MAGIC):
        return "npy"
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return "unknown"


def decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Request body -> float32 grayscale HxW in [0, 1]. PNG, JPEG, .npy or DICOM; anything else is refused."""
    data = bytes(data)
    if not data:
        raise PreprocessError(400, "empty_body", "the request has no image: send PNG or JPEG bytes")
    kind = sniff(data)
    if kind == "npy":
        return _decode_npy(data)
    if kind == "dicom":
        return _decode_dicom(data)
    return _decode_pil(data)


def _check_size(width: int, height: int, min_side: int = MIN_SIDE) -> None:
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise PreprocessError(
            413,
            "image_too_large",
            f"image is {width}x{height}; at most {MAX_PIXELS} pixels and {MAX_SIDE} px a side are accepted",
        )
    if min(width, height) < min_side:
        raise PreprocessError(
            400, "image_too_small", f"image is {width}x{height}; each side must be at least {min_side} px"
        )


def _decode_pil(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=None)
    except UnidentifiedImageError:
        if sniff(data) in ("png", "jpeg"):  # the right signature, then garbage
            kind = sniff(data).upper()
            raise PreprocessError(400, "corrupt_image", f"a {kind} signature but no readable image") from None
        raise PreprocessError(
            415, "unsupported_media_type", "the body is not a PNG or JPEG image (nor a .npy array)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PreprocessError(413, "image_too_large", "image has too many pixels (decompression bomb)") from None
    except Exception as exc:  # Pillow raises many types on a broken header
        raise PreprocessError(400, "corrupt_image", f"cannot read the image header: {exc}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise PreprocessError(
            415, "unsupported_media_type", f"{image.format} images are not accepted; send PNG or JPEG"
        )
    _check_size(*image.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # truncated data, bad chunks, CRC errors, bombs
        raise PreprocessError(400, "corrupt_image", f"the image data is corrupt or truncated: {exc}") from None
    try:
        # Phones and some tools store a radiograph rotated with an EXIF Orientation tag; the model
        # was trained upright, so the tag is applied here, for training and serving alike.
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block
        raise PreprocessError(400, "corrupt_image", f"the image's EXIF orientation is unreadable: {exc}") from None
    return _pil_to_gray(image)


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    # 16-bit grayscale keeps its depth; every 8-bit mode (RGB, RGBA, CMYK, P, LA, 1) goes
    # through Pillow's ITU-R 601 luma conversion. Alpha is dropped, not composited.
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image).astype(np.float32)
        return np.clip(arr / 65535.0, 0.0, 1.0).astype(np.float32)
    if image.mode == "F":
        raise PreprocessError(415, "unsupported_media_type", "floating-point images are not accepted")
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def gray_from_array(arr: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """A 2-D image array (uint8, uint16 or float in [0, 1]) -> float32 HxW in [0, 1], validated.

    min_side guards requests; data set files (e.g. 28x28 PneumoniaMNIST) may pass a smaller one."""
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise PreprocessError(
            400, "invalid_array", f"array must be 2-D (H, W), (1, H, W) or (H, W, 1); got shape {arr.shape}"
        )
    _check_size(arr.shape[1], arr.shape[0], min_side)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535.0)
    if arr.dtype in (np.float32, np.float64, np.float16):
        if not np.isfinite(arr).all():
            raise PreprocessError(400, "invalid_array", "array contains NaN or Inf")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise PreprocessError(400, "invalid_array", "float arrays must hold values in [0, 1]")
        return arr.astype(np.float32)
    raise PreprocessError(
        400, "invalid_array", f"array dtype {arr.dtype} is not accepted; use uint8, uint16 or float in [0, 1]"
    )


def _decode_npy(data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle request data
    except Exception as exc:
        raise PreprocessError(400, "invalid_array", f"cannot read the .npy array: {exc}") from None
    return gray_from_array(arr)


# Projection radiography modalities: computed / digital radiography (and the retired RG, DR codes).
DICOM_MODALITIES = ("CR", "DX", "DR", "RG")
DICOM_BODY_PARTS = ("", "CHEST", "THORAX", "LUNG")


def _decode_dicom(data: bytes) -> np.ndarray:
    """A single-frame grayscale radiograph: modality LUT (rescale slope/intercept), then the VOI
    window when the file has one, else its stored bit range, to [0, 1]; MONOCHROME1 inverted."""
    import pydicom  # only DICOM requests pay for the import
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise PreprocessError(400, "corrupt_dicom", f"cannot parse the DICOM file: {exc}") from None
    modality = str(ds.get("Modality", "")).upper()
    if modality not in DICOM_MODALITIES:
        raise PreprocessError(422, "not_a_radiograph",
                              f"DICOM Modality is '{modality or 'missing'}'; expected one of {DICOM_MODALITIES}")
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part not in DICOM_BODY_PARTS:
        raise PreprocessError(422, "not_a_radiograph", f"DICOM BodyPartExamined is '{body_part}', not the chest")
    if "PixelData" not in ds:
        raise PreprocessError(400, "no_pixel_data", "the DICOM file has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise PreprocessError(400, "invalid_dicom", "only single-frame grayscale DICOM images are accepted")
    _check_size(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)))
    try:
        stored = ds.pixel_array
    except Exception as exc:  # a compressed transfer syntax without a decoder, or broken pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise PreprocessError(415, "unsupported_transfer_syntax",
                              f"cannot decode DICOM pixel data ({name}): {exc}") from None
    values = apply_modality_lut(stored.astype(np.float64), ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(np.ravel(ds.WindowCenter)[0])
        width = max(float(np.ravel(ds.WindowWidth)[0]), 1.0)
        lo, hi = center - width / 2, center + width / 2
    else:  # the full range the stored bits can hold, through the same modality LUT
        bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], np.float64)
        lo, hi = sorted(apply_modality_lut(ends, ds))
    gray = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 1.0 - gray  # MONOCHROME1: high values are dark
    if not np.isfinite(gray).all():
        raise PreprocessError(400, "invalid_dicom", "DICOM pixel values are not finite")
    return gray.astype(np.float32)


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Square bilinear resize of a float32 [0, 1] image (aspect ratio not kept, as in the data set)."""
    if gray.shape == (size, size):
        return gray.astype(np.float32, copy=False)
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))  # 2-D float32 -> mode "F"
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def normalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


def to_model_input(gray: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """Float32 [0, 1] grayscale HxW -> normalised [1, size, size] float32."""
    return normalize(resize(gray, size), mean, std)[None, :, :]


def preprocess(data: bytes | bytearray | memoryview, size: int, mean: float, std: float) -> np.ndarray:
    """Request body -> model input [1, size, size] float32. Raises PreprocessError on bad input."""
    return to_model_input(decode(data), size, mean, std)
