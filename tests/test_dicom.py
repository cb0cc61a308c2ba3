"""DICOM input: every case built here with pydicom (no files committed), decoded by handlers.preprocess.

Expected values are computed from the standard's formulas (PS3.3 C.11), not by calling the
code under test, so a wrong LUT order, range or inversion fails.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from handlers import preprocess
from handlers.constants import MODEL_NAME
from handlers.preprocess import PreprocessError
from handlers.schemas import ErrorBody, Prediction
from serving.settings import ServeSettings
from tests.helpers import keys


def make_dataset(pixels: np.ndarray, bits: int = 8, photometric: str = "MONOCHROME2", modality: str = "DX",
                 pixel_data: bool = True, signed: bool = False, **attrs: object) -> Dataset:
    """A minimal, valid single-frame DX image (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image for Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.PatientID = modality, "CHEST", "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    if pixel_data:
        dtype = f"{'i' if signed else 'u'}{ds.BitsAllocated // 8}"
        ds.PixelData = pixels.astype(dtype).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset, **save_args: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, **save_args)
    return buf.getvalue()


def make_dicom(pixels: np.ndarray, **kw: object) -> bytes:
    return to_bytes(make_dataset(pixels, **kw))


def lut_item(lut: np.ndarray, first_map: int, bits: int) -> Dataset:
    item = Dataset()
    # Both are of ambiguous VR (US/SS, US/OW): name it, as a writer must.
    item.add_new("LUTDescriptor", "US", [len(lut) if len(lut) < 65536 else 0, first_map, bits])
    item.add_new("LUTData", "US", [int(v) for v in lut])
    return item


@pytest.fixture(scope="module")
def gray(sample_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample_jpeg)).convert("L"))


@pytest.fixture(scope="module")
def ramp12() -> np.ndarray:
    """12-bit stored values covering the whole range, 64x64."""
    return (np.arange(64 * 64).reshape(64, 64) * 4095 // (64 * 64 - 1)).astype(np.uint16)


def model_input(body: bytes) -> np.ndarray:
    return preprocess.preprocess(body, 128, 0.48, 0.24)


def test_8bit_dicom_equals_the_jpeg(sample_jpeg: bytes, gray: np.ndarray) -> None:
    np.testing.assert_allclose(model_input(make_dicom(gray)), model_input(sample_jpeg), atol=1e-6)


def test_no_voi_uses_the_stored_range_through_the_rescale(ramp12: np.ndarray) -> None:
    out = preprocess.decode(make_dicom(ramp12, bits=12, RescaleSlope=2, RescaleIntercept=-1000))
    np.testing.assert_allclose(out, ramp12 / 4095, atol=1e-6)


def test_signed_pixels_with_rescale(ramp12: np.ndarray) -> None:
    stored = ramp12.astype(np.int16) - 2048  # 12-bit signed: -2048..2047
    out = preprocess.decode(make_dicom(stored, bits=12, signed=True, RescaleSlope=1, RescaleIntercept=-1024))
    np.testing.assert_allclose(out, (stored + 2048) / 4095, atol=1e-6)


def linear(x: np.ndarray, c: float, w: float) -> np.ndarray:  # PS3.3 C.11.2.1.2.1
    return np.where(x <= c - 0.5 - (w - 1) / 2, 0.0,
                    np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))


def linear_exact(x: np.ndarray, c: float, w: float) -> np.ndarray:  # PS3.3 C.11.2.1.3.2
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))


def sigmoid(x: np.ndarray, c: float, w: float) -> np.ndarray:  # PS3.3 C.11.2.1.3.1
    return 1 / (1 + np.exp(-4 * (x - c) / w))


@pytest.mark.parametrize("function,formula", [(None, linear), ("LINEAR", linear),
                                              ("LINEAR_EXACT", linear_exact), ("SIGMOID", sigmoid)])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_functions_after_the_rescale(ramp12: np.ndarray, function: str | None, formula, photometric: str,
                                            ) -> None:
    slope, intercept, center, width = 2.0, -1000.0, 3000.0, 4001.0  # window in rescaled units
    attrs = {"RescaleSlope": slope, "RescaleIntercept": intercept, "WindowCenter": center, "WindowWidth": width}
    if function:
        attrs["VOILUTFunction"] = function
    out = preprocess.decode(make_dicom(ramp12, bits=12, photometric=photometric, **attrs))
    expected = formula(ramp12 * slope + intercept, center, width)
    if photometric == "MONOCHROME1":
        expected = 1 - expected
    np.testing.assert_allclose(out, expected, atol=2e-6)
    assert (out == out.min()).mean() < 0.5  # the window did not flatten the image


def test_multiple_windows_use_the_first(ramp12: np.ndarray) -> None:
    out = preprocess.decode(make_dicom(ramp12, bits=12, WindowCenter=[1000, 3000], WindowWidth=[500, 2000],
                                       VOILUTFunction="LINEAR_EXACT"))
    np.testing.assert_allclose(out, linear_exact(ramp12.astype(float), 1000, 500), atol=2e-6)


def test_voi_lut_sequence_wins_over_the_window(ramp12: np.ndarray) -> None:
    first_map = 100
    lut = np.round(65535 * (np.linspace(0, 1, 3000) ** 0.5)).astype(np.uint16)  # a gamma curve, 16-bit out
    ds = make_dataset(ramp12, bits=12, WindowCenter=2048, WindowWidth=4096)
    ds.VOILUTSequence = [lut_item(lut, first_map, 16)]
    out = preprocess.decode(to_bytes(ds))
    expected = lut[np.clip(ramp12.astype(int) - first_map, 0, len(lut) - 1)] / 65535
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_modality_lut_sequence(ramp12: np.ndarray) -> None:
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # an inverting modality LUT, 12-bit out
    ds = make_dataset(ramp12, bits=12)
    ds.ModalityLUTSequence = [lut_item(lut, 0, 16)]  # entries are 8 or 16 bits (PS3.3 C.11.1.1.1)
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    np.testing.assert_allclose(preprocess.decode(to_bytes(ds)), 1 - ramp12 / 4095, atol=1e-6)


@pytest.mark.parametrize("photometric,shape,inverted", [
    ("MONOCHROME2", None, False),
    ("MONOCHROME1", None, True),  # no presentation LUT: MONOCHROME1 implies INVERSE
    ("MONOCHROME2", "IDENTITY", False),
    ("MONOCHROME2", "INVERSE", True),
    ("MONOCHROME1", "INVERSE", True),  # DX: MONOCHROME1 carries INVERSE; inverted once, not twice
    ("MONOCHROME1", "IDENTITY", False),  # the presentation LUT's output already is P-values
])
def test_presentation_lut_shape(gray: np.ndarray, photometric: str, shape: str | None, inverted: bool) -> None:
    attrs = {"PresentationLUTShape": shape} if shape else {}
    out = preprocess.decode(make_dicom(gray, photometric=photometric, **attrs))
    np.testing.assert_allclose(out, 1 - gray / 255 if inverted else gray / 255, atol=1e-6)


def test_presentation_lut_sequence_over_the_window_range(ramp12: np.ndarray) -> None:
    # The presentation LUT's input is the VOI output range (not the image's own min..max).
    lut = np.round(1023 * np.linspace(0, 1, 256) ** 2).astype(np.uint16)  # 256 entries, 10-bit P-values
    ds = make_dataset(ramp12[:32], bits=12, WindowCenter=2048, WindowWidth=4096, VOILUTFunction="LINEAR_EXACT")
    ds.PresentationLUTSequence = [lut_item(lut, 0, 10)]
    out = preprocess.decode(to_bytes(ds))
    voi = linear_exact(ramp12[:32].astype(float), 2048, 4096)  # only the lower half of the range is used
    expected = lut[np.floor(voi * 255 + 1e-9).astype(int)] / 1023
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.max() < 0.3  # a min..max stretch would have reached 1


@pytest.mark.parametrize("attrs", [{"WindowCenter": 100, "WindowWidth": 0},  # LINEAR needs width >= 1
                                   {"WindowCenter": 100, "WindowWidth": 50, "VOILUTFunction": "CUBIC"},
                                   {"PresentationLUTShape": "LOG"}])
def test_bad_voi_or_presentation_attributes(gray: np.ndarray, attrs: dict) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(make_dicom(gray, **attrs))
    assert (info.value.status, info.value.type) == (400, "invalid_dicom")


# --- transfer syntaxes ---------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                                    RLELossless, JPEG2000Lossless])
def test_lossless_syntaxes_decode_exactly(ramp12: np.ndarray, gray: np.ndarray, syntax: str) -> None:
    for pixels, bits in ((gray, 8), (ramp12, 12)):
        ds = make_dataset(pixels, bits=bits)
        if syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(syntax)  # pydicom's RLE encoder; pylibjpeg-openjpeg for JPEG 2000
            body = to_bytes(ds)
        elif syntax == ExplicitVRBigEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.PixelData = pixels.astype(">u2" if bits > 8 else "u1").tobytes()  # the writer does not swap it
            body = to_bytes(ds, little_endian=False, implicit_vr=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
            body = to_bytes(ds)
        assert dcmread(io.BytesIO(body)).file_meta.TransferSyntaxUID == syntax
        np.testing.assert_allclose(preprocess.decode(body), pixels / (2**bits - 1), atol=1e-6)


def test_lossy_jpeg2000_is_close(gray: np.ndarray) -> None:
    ds = make_dataset(gray)
    ds.compress(JPEG2000, j2k_psnr=[45])
    out = preprocess.decode(to_bytes(ds))
    assert np.abs(out - gray / 255).mean() < 0.01


def jpeg_dicom(jpeg: bytes, shape: tuple[int, int]) -> bytes:
    ds = make_dataset(np.zeros(shape, np.uint8), pixel_data=False)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


def test_baseline_jpeg_dicom_equals_the_jpeg_file(sample_jpeg: bytes, gray: np.ndarray) -> None:
    # The data set's own JPEG bytes as the DICOM's pixel data: decoded by Pillow either way.
    np.testing.assert_allclose(preprocess.decode(jpeg_dicom(sample_jpeg, gray.shape)),
                               preprocess.decode(sample_jpeg), atol=1e-6)


def undecodable(gray: np.ndarray, syntax: str, payload: bytes = b"\x00\x01\x02\x03" * 64) -> bytes:
    ds = make_dataset(gray, pixel_data=False)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([payload])
    ds["PixelData"].VR = "OB"
    return to_bytes(ds)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEGLosslessSV1, JPEGExtended12Bit])
def test_unsupported_transfer_syntax(gray: np.ndarray, syntax: str) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(undecodable(gray, syntax))
    assert (info.value.status, info.value.type) == (415, "unsupported_transfer_syntax")
    assert "JPEG 2000" in info.value.message and "RLE Lossless" in info.value.message  # says what works


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGBaseline8Bit])
def test_garbage_in_a_supported_syntax_is_corrupt(gray: np.ndarray, syntax: str) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(undecodable(gray, syntax))
    assert (info.value.status, info.value.type) == (400, "corrupt_dicom")


def test_codestream_larger_than_the_header_is_refused_before_decoding(gray: np.ndarray) -> None:
    small = gray[:64, :64]
    ds = make_dataset(small)
    ds.compress(JPEG2000Lossless)
    frame = bytearray(ds.PixelData[ds.PixelData.index(b"\xff\x4f\xff\x51"):])
    # SIZ marker: FF51, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz: claim a 20000 x 20000
    # image in one tile (a decompression bomb)
    frame[8:16] = (20000).to_bytes(4, "big") * 2
    frame[24:32] = (20000).to_bytes(4, "big") * 2
    bomb = make_dataset(small, pixel_data=False)
    bomb.file_meta.TransferSyntaxUID = JPEG2000Lossless
    bomb.PixelData = encapsulate([bytes(frame)])
    bomb["PixelData"].VR = "OB"
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(to_bytes(bomb))
    assert (info.value.status, info.value.type) == (400, "invalid_dicom")
    assert "20000x20000" in info.value.message
    # a baseline JPEG of another size than Rows x Columns
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(jpeg_dicom(png_to_jpeg(small), (32, 32)))
    assert (info.value.status, info.value.type) == (400, "invalid_dicom")


def png_to_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("body_kw,status,kind", [
    ({"pixel_data": False}, 400, "no_pixel_data"),
    ({"modality": "CT"}, 422, "not_a_radiograph"),
    ({"modality": "MR"}, 422, "not_a_radiograph"),
    ({"BodyPartExamined": "KNEE"}, 422, "not_a_radiograph"),
    ({"NumberOfFrames": 2}, 400, "invalid_dicom"),
    ({"photometric": "PALETTE COLOR"}, 400, "invalid_dicom"),
])
def test_bad_dicoms_get_clear_errors(gray: np.ndarray, body_kw: dict, status: int, kind: str) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(make_dicom(gray, **body_kw))
    assert (info.value.status, info.value.type) == (status, kind)


def test_too_large_dicom_refused_from_the_header(gray: np.ndarray) -> None:
    ds = make_dataset(gray, pixel_data=False)
    ds.Rows, ds.Columns = 20000, 20000
    ds.PixelData = b"\x00" * 16
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(to_bytes(ds))
    assert (info.value.status, info.value.type) == (413, "image_too_large")


def test_truncated_dicom(gray: np.ndarray) -> None:
    body = make_dicom(gray)
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(body[: len(body) // 2])
    assert 400 <= info.value.status < 500


@pytest.fixture(scope="module")
def fuzz_bodies() -> dict[str, bytes]:
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    plain = make_dataset(ramp, bits=16, RescaleSlope=1, RescaleIntercept=0, WindowCenter=30000, WindowWidth=20000)
    bodies = {"plain": to_bytes(plain)}
    for syntax in (RLELossless, JPEG2000Lossless):
        ds = make_dataset(ramp, bits=16)
        ds.compress(syntax)
        bodies[str(syntax)] = to_bytes(ds)
    return bodies


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["plain", str(RLELossless), str(JPEG2000Lossless)]), st.integers(0, 100_000),
       st.binary(min_size=1, max_size=32))
def test_damaged_dicoms_never_escape(fuzz_bodies: dict[str, bytes], kind: str, offset: int, patch: bytes) -> None:
    body = fuzz_bodies[kind]
    pos = offset % len(body)
    damaged = body[:pos] + patch + body[pos + len(patch):]
    try:
        x = preprocess.decode(damaged)
    except PreprocessError as err:
        assert 400 <= err.status < 500 and err.message
    else:
        assert x.ndim == 2 and np.isfinite(x).all() and 0 <= x.min() <= x.max() <= 1


@pytest.mark.server
@pytest.mark.slow
def test_server_answers_dicom_like_jpeg(server: ServeSettings, sample_jpeg: bytes, gray: np.ndarray) -> None:
    def post(body: bytes, ctype: str) -> httpx.Response:
        return httpx.post(f"{server.inference_url}/predictions/{MODEL_NAME}", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {keys(server)['inference']}", "Content-Type": ctype})

    jpeg = Prediction.model_validate(post(sample_jpeg, "image/jpeg").json())
    for body in (make_dicom(gray), jpeg_dicom(sample_jpeg, gray.shape)):
        dicom = Prediction.model_validate(post(body, "application/dicom").json())
        assert dicom.label == jpeg.label and abs(dicom.probability - jpeg.probability) <= 1e-5
    ds = make_dataset(gray)
    ds.compress(JPEG2000Lossless)
    j2k = Prediction.model_validate(post(to_bytes(ds), "application/dicom").json())
    assert abs(j2k.probability - jpeg.probability) <= 1e-5
    r = post(make_dicom(gray, modality="CT"), "application/dicom")
    assert r.status_code == 422 and ErrorBody.model_validate(r.json()).type == "not_a_radiograph"
    r = post(undecodable(gray, JPEGLSLossless), "application/dicom")
    assert r.status_code == 415 and ErrorBody.model_validate(r.json()).type == "unsupported_transfer_syntax"
