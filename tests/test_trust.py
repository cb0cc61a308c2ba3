"""The trust layer in-process: the OOD image set, the detector and its graph, calibration, operating points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.preprocess import decode, to_model_input
from handlers.schemas import Calibration, OodGate, OperatingPoint
from handlers.trust import (
    TrustError,
    calibrated,
    is_foreign,
    label_of,
    margin_of,
    resolve_point,
)
from tests.helpers import synthetic_xray
from training import calibration as cal
from training import ood
from training.models import build_model
from training.ood_images import BORDER_CASES, border_cases, encode_png, ood_set

SIZE = 64


@pytest.fixture(scope="module")
def ood_images() -> list:
    return ood_set()


def test_ood_set_is_varied_valid_and_deterministic(ood_images: list) -> None:
    kinds = {o.kind for o in ood_images}
    assert {"photo", "texture", "document", "chart", "medical", "noise", "flat", "gradient"} <= kinds
    assert len(ood_images) >= 150
    assert len({o.name for o in ood_images}) == len(ood_images)
    again = ood_set()
    assert all(np.array_equal(a.gray, b.gray) for a, b in zip(ood_images, again, strict=True))
    for o in ood_images:
        assert o.gray.dtype == np.float32 and o.gray.ndim == 2
        assert o.gray.min() >= 0.0 and o.gray.max() <= 1.0


def test_every_ood_image_is_accepted_by_the_decoder(ood_images: list) -> None:
    """A live check POSTs these as PNG: the gate, not the decoder, must be what refuses them."""
    for o in ood_images[::7]:
        back = decode(encode_png(o.gray))
        assert back.shape == o.gray.shape
        assert np.abs(back - o.gray).max() <= 1 / 255 + 1e-6


def test_border_cases_keep_the_radiograph_recognisable() -> None:
    g = synthetic_xray(1, np.random.default_rng(0), 300).astype(np.float32) / 255
    cases = {b.kind: b.gray for b in border_cases([g])}
    assert set(cases) == {f"border/{k}" for k in BORDER_CASES}
    np.testing.assert_allclose(cases["border/inverted"], 1 - g)
    np.testing.assert_array_equal(cases["border/rotated_90"], np.rot90(g))
    assert cases["border/downscaled_64"].shape == (64, 64)
    assert cases["border/screenshot"].shape[1] > g.shape[1]


@pytest.fixture(scope="module")
def fitted() -> dict:
    """An untrained MLP and CNN with a detector fitted on synthetic radiographs: enough to test the
    mechanics (the input statistics alone tell images from flat fields and noise)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 240)
    grays = [synthetic_xray(int(y), rng, 96).astype(np.float32) / 255 for y in labels]
    x = torch.from_numpy(np.stack([to_model_input(g, SIZE, 0.5, 0.25) for g in grays]))
    out = {}
    torch.manual_seed(0)
    for arch in ("mlp", "xraynet"):
        model = build_model(arch, "bce", SIZE).eval()
        _, feats = ood.extract(model, x)
        train = [f[:160] for f in feats]
        val = [f[160:] for f in feats]
        det = ood.fit_detector(train, labels[:160], val, ood.layer_names(model))
        out[arch] = (model, det, x)
    return out


@pytest.mark.parametrize("arch", ["mlp", "xraynet"])
def test_detector_threshold_passes_validation_and_refuses_blank_and_noise(fitted: dict, arch: str) -> None:
    model, det, x = fitted[arch]
    val_scores = det.score([f for f in ood.extract(model, x[160:])[1]])
    assert np.mean(val_scores <= det.threshold) >= 0.995
    rng = np.random.default_rng(1)
    foreign = [np.full((96, 96), 0.5, np.float32), np.zeros((96, 96), np.float32),
               rng.uniform(0, 1, (96, 96)).astype(np.float32),
               np.tile(np.linspace(0, 1, 96, dtype=np.float32), (96, 1))]
    xf = torch.from_numpy(np.stack([to_model_input(g, SIZE, 0.5, 0.25) for g in foreign]))
    scores = det.score(ood.extract(model, xf)[1])
    assert (scores > det.threshold).all(), scores


@pytest.mark.parametrize("arch", ["mlp", "xraynet"])
def test_guarded_graph_gives_the_models_logits_and_the_detectors_score(fitted: dict, arch: str) -> None:
    model, det, x = fitted[arch]
    guarded = ood.Guarded(model, det).eval()
    scripted = torch.jit.script(guarded)
    batch = torch.cat([x[:5], torch.full((1, 1, SIZE, SIZE), 3.0)])
    with torch.no_grad():
        logits, score = guarded(batch)
        s_logits, s_score = scripted(batch)
        expected = model(batch)
    assert torch.equal(logits, expected) and torch.equal(s_logits, expected)
    reference = det.score(ood.extract(model, batch)[1])
    np.testing.assert_allclose(score.numpy(), reference, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(s_score.numpy(), score.numpy(), rtol=1e-6)
    # Each image's score is its own: the batch does not change it.
    with torch.no_grad():
        alone = guarded(batch[2:3])[1]
    assert torch.allclose(alone, score[2:3], rtol=1e-5)


def test_segments_cut_every_architecture_into_a_chain_equal_to_forward() -> None:
    torch.manual_seed(0)
    for arch in ("mlp", "bn_mlp", "cnn", "gap_cnn", "xraynet"):
        for head in ("bce", "ce"):
            model = build_model(arch, head, SIZE).eval()
            h = x = torch.randn(3, 1, SIZE, SIZE)
            segs = ood.segments(model)
            assert len(segs) >= 3, arch
            with torch.no_grad():
                for seg in segs:
                    h = seg(h)
                assert torch.equal(h, model(x)), arch


def test_platt_fixes_a_shifted_margin_and_temperature_cannot() -> None:
    rng = np.random.default_rng(0)
    true_margin = rng.normal(0, 3, 4000)
    y = (rng.uniform(size=4000) < 1 / (1 + np.exp(-true_margin))).astype(int)
    served = 0.5 * true_margin - 2.0  # what a class-weighted loss does: too flat and shifted
    raw = cal.ece(y, calibrated(served, None))
    platt = cal.fit_platt(served, y)
    temp = cal.fit_temperature(served, y)
    assert platt.a == pytest.approx(2.0, rel=0.1) and platt.b == pytest.approx(4.0, rel=0.1)
    assert cal.ece(y, calibrated(served, platt)) < 0.02 < raw
    assert cal.ece(y, calibrated(served, temp)) > cal.ece(y, calibrated(served, platt))
    assert cal.brier(y, calibrated(served, platt)) < cal.brier(y, calibrated(served, None))


def test_ece_by_hand() -> None:
    y = np.array([0, 1, 1, 1])
    p = np.array([0.02, 0.98, 0.5, 0.5])  # bins: [0, 1/15), [14/15, 1], and 0.5 twice in bin 7
    # |0.02 - 0| * 1/4 + |0.98 - 1| * 1/4 + |0.5 - 1| * 2/4
    assert cal.ece(y, p) == pytest.approx(0.005 + 0.005 + 0.25)
    assert cal.ece(y, y.astype(float)) == 0.0


def test_operating_points_meet_their_targets_on_the_data_they_were_chosen_on() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    prob = np.clip(0.5 + (y - 0.5) * 0.5 + rng.normal(0, 0.25, 1000), 0, 1)
    points = cal.fit_operating_points(y, prob)
    assert set(points) == {"balanced", "high_sensitivity", "high_specificity"}
    m = cal.metrics_at_points(y, prob, points)
    assert m["high_sensitivity"]["sensitivity"] >= 0.98
    assert m["high_specificity"]["specificity"] >= 0.98
    assert points["high_sensitivity"].threshold < points["balanced"].threshold < points["high_specificity"].threshold
    assert m["balanced"]["balanced_accuracy"] >= max(m["high_sensitivity"]["balanced_accuracy"],
                                                      m["high_specificity"]["balanced_accuracy"])


def test_handler_rules() -> None:
    points = {"balanced": OperatingPoint(threshold=0.4), "high_sensitivity": OperatingPoint(threshold=0.1)}
    assert resolve_point(points, None) == ("balanced", points["balanced"])
    assert resolve_point(points, " high_sensitivity ")[0] == "high_sensitivity"
    with pytest.raises(TrustError) as err:
        resolve_point(points, "paranoid")
    assert err.value.status == 400 and err.value.type == "unknown_operating_point"
    names = ("NORMAL", "PNEUMONIA")
    assert label_of(0.4, 0.4, names) == "PNEUMONIA" and label_of(0.39, 0.4, names) == "NORMAL"
    np.testing.assert_allclose(margin_of(np.array([[1.0, 3.0]]), "ce"), [2.0])
    c = Calibration(method="platt", a=2.0, b=-1.0)
    np.testing.assert_allclose(calibrated(np.array([0.5, 0.0]), c), [0.5, 1 / (1 + np.e)])
    gate = OodGate(threshold=10.0)
    assert is_foreign(10.5, gate) and not is_foreign(10.0, gate) and is_foreign(float("nan"), gate)
    assert not is_foreign(1e9, None)


def test_threshold_holds_on_new_radiographs_when_validation_is_small() -> None:
    """The threshold rests on validation plus the training split scored out of fold: with 30
    validation images alone its 99.5th percentile is their maximum, a noisy estimate of the tail."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return rng.standard_normal((n, 8)) + 2.0 * y[:, None], y

    (f_train, y_train), (f_val, _), (f_new, _) = draw(2000), draw(30), draw(20000)
    det = ood.fit_detector([f_train], y_train, [f_val], ["layer"], two_sided=False)
    refused = float(np.mean(det.score([f_new]) > det.threshold))
    assert 0.002 <= refused <= 0.01, refused
    oof = ood.out_of_fold_d2("layer", f_train, y_train)
    in_sample = det.layers[0].d2(f_train)
    assert oof.mean() > in_sample.mean()  # out of fold is the unseen image's view: farther
