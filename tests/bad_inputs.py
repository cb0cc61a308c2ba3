"""The bad-input catalogue: each case's body, content type, and the status and error type it must get.

Used twice: against handlers.preprocess directly (tests/test_preprocess.py) and against the
live server, alone and inside a batch of good requests (tests/test_reliability.py).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    status: int  # 200 for inputs we accept
    type: str | None  # the ErrorBody type, None when accepted
    content_type: str = "application/octet-stream"


def _save(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


FORM = "multipart/form-data; boundary=XBOUNDARYX"


def _form(parts: list[tuple[bytes, bytes]], extra_headers: bytes = b"") -> bytes:
    """A multipart/form-data body with boundary XBOUNDARYX: (disposition params, data) per part."""
    out = b""
    for params, data in parts:
        out += (b"--XBOUNDARYX\r\nContent-Disposition: form-data; " + params + b'; filename="x"\r\n' + extra_headers
                + b"\r\n" + data + b"\r\n")
    return out + b"--XBOUNDARYX--\r\n"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _bomb_png(side: int = 20_000) -> bytes:
    """A valid-looking PNG header claiming side x side pixels, with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    rows = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # only 64 rows of data: truncated
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def cases(good_jpeg: bytes) -> list[Case]:
    gray = np.asarray(Image.open(io.BytesIO(good_jpeg)).convert("L"))
    image = Image.fromarray(gray)
    png = _save(image, "PNG")
    rgb = Image.merge("RGB", [image] * 3)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    nan = gray.astype(np.float32) / 255
    nan[10, 10] = np.nan
    inf = gray.astype(np.float32) / 255
    inf[0, 0] = np.inf
    header_broken = bytearray(png)
    header_broken[16:24] = b"\xff" * 8  # width/height of IHDR: garbage, CRC now wrong
    return [
        # accepted
        Case("jpeg", good_jpeg, 200, None, "image/jpeg"),
        Case("png_8bit_gray", png, 200, None, "image/png"),
        Case("png_16bit_gray", _save(sixteen, "PNG"), 200, None, "image/png"),
        Case("png_rgb", _save(rgb, "PNG"), 200, None, "image/png"),
        Case("png_rgba", _save(rgb.convert("RGBA"), "PNG"), 200, None, "image/png"),
        Case("png_palette", _save(image.convert("P"), "PNG"), 200, None, "image/png"),
        Case("jpeg_cmyk", _save(rgb.convert("CMYK"), "JPEG"), 200, None, "image/jpeg"),
        Case("jpeg_rgb", _save(rgb, "JPEG", quality=95), 200, None, "image/jpeg"),
        Case("npy_uint8", _npy(gray), 200, None),
        Case("npy_uint16", _npy(gray.astype(np.uint16) * 257), 200, None),
        Case("npy_float_unit", _npy(gray.astype(np.float32) / 255), 200, None),
        Case("png_non_square", _save(image.resize((180, 240)), "PNG"), 200, None, "image/png"),
        # refused
        Case("empty_body", b"", 400, "empty_body"),
        Case("text", b"hello, I am not an image", 415, "unsupported_media_type"),
        Case("json_in_octet_stream", b'{"image": "x.png"}', 415, "unsupported_media_type"),
        Case("html", b"<html><body>radiograph</body></html>", 415, "unsupported_media_type"),
        Case("truncated_png", png[: len(png) // 2], 400, "corrupt_image", "image/png"),
        Case("truncated_jpeg", good_jpeg[: len(good_jpeg) // 3], 400, "corrupt_image", "image/jpeg"),
        Case("png_header_only", png[:33], 400, "corrupt_image", "image/png"),
        Case("jpeg_magic_only", b"\xff\xd8\xff\xe0" + b"\x00" * 16, 400, "corrupt_image", "image/jpeg"),
        Case("png_corrupt_header", bytes(header_broken), 400, "corrupt_image", "image/png"),
        Case("png_1x1", _save(Image.new("L", (1, 1)), "PNG"), 400, "image_too_small", "image/png"),
        Case("png_8x300", _save(Image.new("L", (8, 300)), "PNG"), 400, "image_too_small", "image/png"),
        Case("png_bomb_20000", _bomb_png(), 413, "image_too_large", "image/png"),
        Case("gif", _save(image, "GIF"), 415, "unsupported_media_type", "image/gif"),
        Case("bmp", _save(image, "BMP"), 415, "unsupported_media_type", "image/bmp"),
        Case("tiff", _save(image, "TIFF"), 415, "unsupported_media_type", "image/tiff"),
        Case("webp", _save(image, "WEBP"), 415, "unsupported_media_type", "image/webp"),
        Case("npy_3d_rgb", _npy(np.stack([gray] * 3, 0)), 400, "invalid_array"),
        Case("npy_1d", _npy(gray.reshape(-1)), 400, "invalid_array"),
        Case("npy_int64", _npy(gray.astype(np.int64)), 400, "invalid_array"),
        Case("npy_bool", _npy(gray > 128), 400, "invalid_array"),
        Case("npy_float_nan", _npy(nan), 400, "invalid_array"),
        Case("npy_float_inf", _npy(inf), 400, "invalid_array"),
        Case("npy_float_out_of_range", _npy(gray.astype(np.float32)), 400, "invalid_array"),
        Case("npy_object_pickle", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
             + b" " * 53 + b"\n" + b"\x80\x04N.", 400, "invalid_array"),
        Case("npy_truncated", _npy(gray)[:200], 400, "invalid_array"),
        Case("npy_tiny", _npy(np.zeros((4, 4), np.uint8)), 400, "image_too_small"),
        # multipart, parsed by the handler (TorchServe's own parser answered 500 with Java internals)
        Case("multipart_ok", _form([(b'name="data"', png)]), 200, None, FORM),
        Case("multipart_empty_name", _form([(b'name=""', png)]), 400, "malformed_multipart", FORM),
        Case("multipart_base64_part", _form([(b'name="data"', b"aGVsbG8=")], b"Content-Transfer-Encoding: base64\r\n"),
             415, "unsupported_transfer_encoding", FORM),
        Case("multipart_unknown_charset", _form([(b'name="data"', png)]), 200, None, FORM + "; charset=x-klingon"),
        Case("multipart_no_boundary", _form([(b'name="data"', png)]), 400, "malformed_multipart",
             "multipart/form-data"),
        Case("multipart_unclosed", _form([(b'name="data"', png)])[:-8], 400, "malformed_multipart", FORM),
        Case("multipart_garbage", b"--XBOUNDARYX\r\nno headers at all", 400, "malformed_multipart", FORM),
        Case("multipart_wrong_field", _form([(b'name="image"', png)]), 400, "missing_field", FORM),
        Case("multipart_json_part", _form([(b'name="data"', b'{"a": 1}')], b"Content-Type: application/json\r\n"),
             415, "unsupported_media_type", FORM),
    ]
