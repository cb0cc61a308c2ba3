"""Pydantic models shared by training, export, the handler and the client.

ModelCard travels inside every checkpoint and exported model file, so the server reads
class names, head, input size, normalisation and threshold from the model itself.
Prediction and ErrorBody are the HTTP response bodies of POST /predictions/xray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"

Head = Literal["bce", "ce"]
Backend = Literal["onnxruntime", "torchscript"]
DEFAULT_POINT = "balanced"


class Calibration(BaseModel):
    """Served P(PNEUMONIA) = sigmoid(a * margin + b), margin = the logit margin; fitted on validation
    (Platt scaling; temperature scaling is the special case b = 0)."""

    model_config = ConfigDict(frozen=True)

    method: Literal["platt", "temperature", "none"] = "none"
    a: float = 1.0
    b: float = 0.0
    val_ece: float | None = None
    val_brier: float | None = None


class OperatingPoint(BaseModel):
    """A named threshold on the calibrated P(PNEUMONIA), with what it gave on validation."""

    model_config = ConfigDict(frozen=True)

    threshold: float = Field(ge=0.0, le=1.0)
    description: str = ""
    val_sensitivity: float | None = None
    val_specificity: float | None = None


class OodGate(BaseModel):
    """The out-of-distribution gate: an image whose `ood_score` (a model output) exceeds `threshold`
    is refused. The detector's statistics live inside the model file; this is what the card says."""

    model_config = ConfigDict(frozen=True)

    method: str = "mahalanobis"
    threshold: float
    layers: list[str] = Field(default_factory=list)
    two_sided: bool = True
    val_quantile: float = Field(0.995, description="the share of the reference radiographs that pass")
    reference: str = Field("validation", description="the radiographs the threshold was set on")


class ModelCard(BaseModel):
    """Everything needed to rebuild, preprocess for and interpret a model."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str = Field(description="run or family name, e.g. 'xraynet'")
    arch: str = Field(description="key of training.models.ARCHS")
    arch_args: dict[str, Any] = Field(default_factory=dict)
    head: Head
    input_size: int = Field(gt=0)
    mean: float
    std: float = Field(gt=0)
    class_names: tuple[str, str] = CLASS_NAMES
    threshold: float = Field(default=0.5, ge=0.0, le=1.0,
                             description="the default operating point's threshold on the served P(pneumonia)")
    calibration: Calibration | None = None
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)
    default_point: str = DEFAULT_POINT
    ood: OodGate | None = None
    val_metrics: dict[str, float] = Field(default_factory=dict)
    test_metrics: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    version: str = "1.0"
    checkpoint_sha256: str | None = None
    versions: dict[str, str] = Field(default_factory=dict, description="library versions that made it")

    @property
    def n_outputs(self) -> int:
        return 1 if self.head == "bce" else 2


class Prediction(BaseModel):
    """The 200 answer of POST /predictions/xray."""

    label: Literal["NORMAL", "PNEUMONIA"]
    probability: float = Field(ge=0.0, le=1.0, description="P(PNEUMONIA)")
    probabilities: dict[str, float]
    threshold: float = Field(description="the operating point's threshold: label = PNEUMONIA iff probability >= it")
    operating_point: str = DEFAULT_POINT
    ood_score: float | None = Field(default=None, description="out-of-distribution score; refused above the card's")
    model: str
    version: str
    backend: Backend
    device: str


class ErrorBody(BaseModel):
    """The 4xx/5xx answer: {code, type, message}."""

    code: int
    type: str
    message: str
    ood_score: float | None = Field(default=None, description="not_chest_xray only: the image's score")
    ood_threshold: float | None = Field(default=None, description="not_chest_xray only: the refusal threshold")


class Explanation(BaseModel):
    """The 200 answer of POST /explanations/xray: the prediction and a Grad-CAM heatmap."""

    prediction: Prediction
    target: Literal["NORMAL", "PNEUMONIA"] = Field(description="the class the heatmap explains")
    heatmap: list[list[float]] = Field(description="[H][W] in [0, 1], at the model's input size")
    overlay_png: str = Field(description="base64 PNG: the model's input with the heatmap on top")
