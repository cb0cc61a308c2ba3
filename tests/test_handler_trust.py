"""The handler's trust layer in process: OOD refusals, calibrated probability, operating points.

A tiny ONNX graph with both outputs a guarded export has: logits (flatten + dense, as in
test_handler) and ood_score = the mean of the normalised input, so a white image is foreign and a
noise image is not. Its card carries a calibration, three operating points and the OOD gate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from ts.context import Context

from handlers.backends import CARD_KEY, INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME
from handlers.preprocess import preprocess
from handlers.schemas import Calibration, ErrorBody, ModelCard, OodGate, OperatingPoint, Prediction
from handlers.xray_handler import XrayHandler
from tests.helpers import png_bytes
from tests.test_handler import SIZE, WEIGHTS, handle, image, make_context, request

POINTS = {"balanced": OperatingPoint(threshold=0.5), "high_sensitivity": OperatingPoint(threshold=0.2),
          "high_specificity": OperatingPoint(threshold=0.8)}
CARD = ModelCard(name="tiny", arch="mlp", head="ce", input_size=SIZE, mean=0.5, std=0.25, threshold=0.5,
                 calibration=Calibration(method="platt", a=2.0, b=-0.5), operating_points=POINTS,
                 ood=OodGate(threshold=1.0, layers=["mean"]))


def guarded_onnx(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w"], [OUTPUT_NAME]),
         helper.make_node("ReduceMean", ["flat", "axes"], [OOD_OUTPUT], keepdims=0)],
        "tiny_guarded", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info(OOD_OUTPUT, TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor("w", TensorProto.FLOAT, WEIGHTS.shape, WEIGHTS.ravel()),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {CARD_KEY: CARD.model_dump_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def expected(body: bytes) -> tuple[float, float]:
    """(calibrated probability, ood score) computed here from the graph's definition."""
    x = preprocess(body, SIZE, CARD.mean, CARD.std).reshape(1, -1).astype(np.float64)
    logits = x @ WEIGHTS
    margin = logits[0, 1] - logits[0, 0]
    return float(1 / (1 + np.exp(-(2.0 * margin - 0.5)))), float(x.mean())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[XrayHandler, Context]:
    d = tmp_path_factory.mktemp("guarded")
    guarded_onnx(d / "tiny.onnx")
    context = make_context(d, explainer=False)
    handler = XrayHandler()
    handler.initialize(context)
    return handler, context


WHITE = png_bytes(np.full((64, 64), 255, np.uint8))


def test_foreign_images_are_refused_and_leave_batch_mates_bit_for_bit(served: tuple[XrayHandler, Context]) -> None:
    a, b = image(40), image(41)
    alone = [handle(*served, [request(x)])[0] for x in (a, b)]
    mixed = handle(*served, [request(a), request(WHITE), request(b), request(WHITE, "image/png")])
    assert [s for s, _ in mixed] == [200, 422, 200, 422]
    assert mixed[0] == alone[0] and mixed[2] == alone[1]
    for _, body in (mixed[1], mixed[3]):
        assert set(body) == {"code", "type", "message", "ood_score", "ood_threshold"}
        err = ErrorBody.model_validate(body)
        assert (err.code, err.type, err.ood_threshold) == (422, "not_chest_xray", 1.0)
        assert err.ood_score == pytest.approx(expected(WHITE)[1], rel=1e-5) and err.ood_score > 1.0


def test_served_probability_is_calibrated_and_the_label_follows_the_point(served: tuple[XrayHandler, Context]) -> None:
    bodies = [image(50 + i) for i in range(8)]
    answers = handle(*served, [request(x) for x in bodies])
    for (status, body), sent in zip(answers, bodies, strict=True):
        assert status == 200
        pred = Prediction.model_validate(body)
        prob, score = expected(sent)
        assert pred.probability == pytest.approx(prob, abs=1e-5)
        assert pred.ood_score == pytest.approx(score, abs=1e-5)
        assert (pred.operating_point, pred.threshold) == ("balanced", 0.5)
        assert pred.label == ("PNEUMONIA" if pred.probability >= pred.threshold else "NORMAL")


def test_operating_point_by_header_or_field_and_unknown_names(served: tuple[XrayHandler, Context]) -> None:
    x = image(60)
    answers = handle(*served, [request(x, headers={"X-Operating-Point": "high_sensitivity"}),
                               request(x, fields={"operating_point": b"high_specificity"}),
                               request(x, headers={"x-operating-point": "paranoid"}),
                               request(x)])
    assert [s for s, _ in answers] == [200, 200, 400, 200]
    points = [Prediction.model_validate(answers[i][1]) for i in (0, 1, 3)]
    assert [(p.operating_point, p.threshold) for p in points] == [
        ("high_sensitivity", 0.2), ("high_specificity", 0.8), ("balanced", 0.5)]
    assert len({p.probability for p in points}) == 1, "the point changes the label's threshold, not the probability"
    for p in points:
        assert p.label == ("PNEUMONIA" if p.probability >= p.threshold else "NORMAL")
    err = ErrorBody.model_validate(answers[2][1])
    assert (err.type, err.code) == ("unknown_operating_point", 400) and "paranoid" in err.message
    assert err.ood_score is None and "ood_score" not in answers[2][1]
