"""DICOM input: built with pydicom from the shared test images; decoded by handlers.preprocess."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, generate_uid

from handlers import preprocess
from handlers.constants import MODEL_NAME
from handlers.preprocess import PreprocessError
from handlers.schemas import ErrorBody, Prediction
from serving.settings import ServeSettings
from tests.helpers import keys


def make_dicom(pixels: np.ndarray, bits: int = 8, photometric: str = "MONOCHROME2", modality: str = "DX",
               pixel_data: bool = True, **attrs: object) -> bytes:
    """A minimal, valid single-frame DICOM Part 10 file (Explicit VR Little Endian)."""
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
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gray(sample_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample_jpeg)).convert("L"))


def model_input(body: bytes) -> np.ndarray:
    return preprocess.preprocess(body, 128, 0.48, 0.24)


def test_8bit_dicom_equals_the_jpeg(sample_jpeg: bytes, gray: np.ndarray) -> None:
    np.testing.assert_allclose(model_input(make_dicom(gray)), model_input(sample_jpeg), atol=1e-6)


def test_12bit_with_rescale_and_window(sample_jpeg: bytes, gray: np.ndarray) -> None:
    # stored 12-bit values, a rescale to "HU-like" units, and a window covering exactly the image range
    stored = gray.astype(np.uint16) * 16
    body = make_dicom(stored, bits=12, RescaleSlope=2, RescaleIntercept=-1000,
                      WindowCenter=-1000 + 255 * 16, WindowWidth=2 * 255 * 16)
    np.testing.assert_allclose(model_input(body), model_input(sample_jpeg), atol=1e-4)
    no_window = make_dicom(stored, bits=12)  # no window: the 12-bit range
    np.testing.assert_allclose(preprocess.decode(no_window), gray / 255 * (255 * 16 / 4095), atol=1e-6)


def test_monochrome1_is_inverted(gray: np.ndarray) -> None:
    inverted = preprocess.decode(make_dicom(255 - gray, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, gray / 255, atol=1e-6)


@pytest.mark.parametrize("body_kw,status,kind", [
    ({"pixel_data": False}, 400, "no_pixel_data"),
    ({"modality": "CT"}, 422, "not_a_radiograph"),
    ({"modality": "MR"}, 422, "not_a_radiograph"),
    ({"BodyPartExamined": "KNEE"}, 422, "not_a_radiograph"),
    ({"NumberOfFrames": 2}, 400, "invalid_dicom"),
])
def test_bad_dicoms_get_clear_errors(gray: np.ndarray, body_kw: dict, status: int, kind: str) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(make_dicom(gray, **body_kw))
    assert (info.value.status, info.value.type) == (status, kind)


def compressed_dicom(gray: np.ndarray, syntax: str) -> bytes:
    body = make_dicom(gray)
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(body))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00\x01\x02\x03" * 64])  # not decodable
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGBaseline8Bit])
def test_unsupported_transfer_syntax(gray: np.ndarray, syntax: str) -> None:
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(compressed_dicom(gray, syntax))
    assert info.value.status == 415 and info.value.type == "unsupported_transfer_syntax"


def test_truncated_dicom(gray: np.ndarray) -> None:
    body = make_dicom(gray)
    with pytest.raises(PreprocessError) as info:
        preprocess.decode(body[: len(body) // 2])
    assert 400 <= info.value.status < 500


@pytest.mark.server
@pytest.mark.slow
def test_server_answers_dicom_like_jpeg(server: ServeSettings, sample_jpeg: bytes, gray: np.ndarray) -> None:
    def post(body: bytes, ctype: str) -> httpx.Response:
        return httpx.post(f"{server.inference_url}/predictions/{MODEL_NAME}", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {keys(server)['inference']}", "Content-Type": ctype})

    jpeg = Prediction.model_validate(post(sample_jpeg, "image/jpeg").json())
    dicom = Prediction.model_validate(post(make_dicom(gray), "application/dicom").json())
    assert dicom.label == jpeg.label and abs(dicom.probability - jpeg.probability) <= 1e-3
    r = post(make_dicom(gray, modality="CT"), "application/dicom")
    assert r.status_code == 422 and ErrorBody.model_validate(r.json()).type == "not_a_radiograph"
    r = post(compressed_dicom(gray, JPEG2000Lossless), "application/dicom")
    assert r.status_code == 415 and ErrorBody.model_validate(r.json()).type == "unsupported_transfer_syntax"
