"""handlers.preprocess: the one preprocessing, its bad-input errors, and a fuzz of its decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from handlers import preprocess
from handlers.preprocess import PreprocessError
from handlers.request import payload, request_fields
from tests.bad_inputs import cases
from tests.helpers import png_bytes


@pytest.fixture(scope="module")
def catalogue(sample_jpeg: bytes) -> dict:
    return {c.name: c for c in cases(sample_jpeg)}


def test_catalogue_meets_every_refusal_status(catalogue: dict) -> None:
    """Run over the whole catalogue, preprocess accepts some inputs and refuses others with 400, 413 and 415."""
    seen = set()
    for case in catalogue.values():
        try:
            preprocess.preprocess(case.body, 64, 0.5, 0.25)
            seen.add(200)
        except PreprocessError as err:
            seen.add(err.status)
    assert seen == {200, 400, 413, 415}


@pytest.mark.parametrize("name", [c.name for c in cases(png_bytes(np.full((64, 64), 128, np.uint8)))])
def test_each_case_gets_its_status(catalogue: dict, name: str) -> None:
    case = catalogue[name]

    def run() -> np.ndarray:  # the handler's path: a form parsed into fields, the image picked, preprocessed
        return preprocess.preprocess(payload(request_fields({"body": case.body}, case.content_type)), 64, 0.5, 0.25)

    if case.status == 200:
        x = run()
        assert x.shape == (1, 64, 64) and x.dtype == np.float32 and np.isfinite(x).all()
        return
    with pytest.raises(PreprocessError) as info:
        run()
    assert (info.value.status, info.value.type) == (case.status, case.type), info.value.message
    assert info.value.message


def test_bit_depth_and_colour_do_not_change_the_input(catalogue: dict) -> None:
    """8-bit, 16-bit (x257) PNG, RGB PNG and uint8 .npy of one image give identical model input."""
    ref = preprocess.preprocess(catalogue["png_8bit_gray"].body, 128, 0.48, 0.24)
    for name in ("png_16bit_gray", "png_rgb", "npy_uint8", "npy_uint16", "png_rgba"):
        x = preprocess.preprocess(catalogue[name].body, 128, 0.48, 0.24)
        np.testing.assert_allclose(x, ref, atol=1e-5, err_msg=name)


def test_decode_scales_to_unit_range() -> None:
    arr = np.array([[0, 255] * 32] * 64, np.uint8)
    gray = preprocess.decode(png_bytes(arr))
    assert gray.dtype == np.float32 and gray.min() == 0.0 and gray.max() == 1.0


def test_resize_and_normalise() -> None:
    gray = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    x = preprocess.to_model_input(gray, 64, 0.5, 0.25)
    assert x.shape == (1, 64, 64)
    assert x.min() == pytest.approx(-2.0, abs=0.05) and x.max() == pytest.approx(2.0, abs=0.05)
    np.testing.assert_array_equal(preprocess.resize(gray, 224), gray)  # its own size: untouched
    half = preprocess.resize(gray, 112)
    assert half.shape == (112, 112) and np.all(np.diff(half.ravel()) >= -1e-6), "a ramp stays a ramp"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes_give_a_tensor_or_our_error(data: bytes) -> None:
    try:
        x = preprocess.preprocess(data, 32, 0.5, 0.25)
    except PreprocessError as err:
        assert 400 <= err.status < 500 and err.type and err.message
    else:
        assert x.shape == (1, 32, 32) and np.isfinite(x).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["png", "jpeg", "npy"]), st.integers(0, 10_000), st.binary(min_size=1, max_size=64),
       st.integers(1, 4))
def test_damaged_real_encodings_never_escape(kind: str, offset: int, patch: bytes, side_div: int) -> None:
    """Flip bytes inside real PNG/JPEG/.npy encodings: still a valid tensor or PreprocessError."""
    arr = (np.arange(96 * 96) % 251).astype(np.uint8).reshape(96, 96)[:, : 96 // side_div * side_div]
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, arr)
        body = buf.getvalue()
    else:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=kind.upper())
        body = buf.getvalue()
    pos = offset % len(body)
    damaged = body[:pos] + patch + body[pos + len(patch):]
    try:
        x = preprocess.preprocess(damaged, 32, 0.5, 0.25)
    except PreprocessError as err:
        assert 400 <= err.status < 500
    else:
        assert x.shape == (1, 32, 32) and np.isfinite(x).all()


@pytest.mark.parametrize("orientation,transpose", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                                   (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(sample_jpeg: bytes, orientation: int, transpose: Image.Transpose) -> None:
    """A radiograph stored rotated with an EXIF Orientation tag decodes upright: the same input as
    the upright image (issue 12: orientation 6 was read sideways and flipped labels)."""
    upright = Image.open(io.BytesIO(sample_jpeg)).convert("L").resize((160, 128))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(transpose)  # what the camera wrote; the tag says how to turn it back
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    ref = io.BytesIO()
    upright.save(ref, "PNG")
    np.testing.assert_array_equal(preprocess.decode(buf.getvalue()), preprocess.decode(ref.getvalue()))
    assert preprocess.decode(buf.getvalue()).shape == (128, 160)
