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
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="on P(pneumonia), tuned on val")
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
    threshold: float
    model: str
    version: str
    backend: Backend
    device: str


class ErrorBody(BaseModel):
    """The 4xx/5xx answer: {code, type, message}."""

    code: int
    type: str
    message: str


class Explanation(BaseModel):
    """The 200 answer of POST /explanations/xray: the prediction and a Grad-CAM heatmap."""

    prediction: Prediction
    target: Literal["NORMAL", "PNEUMONIA"] = Field(description="the class the heatmap explains")
    heatmap: list[list[float]] = Field(description="[H][W] in [0, 1], at the model's input size")
    overlay_png: str = Field(description="base64 PNG: the model's input with the heatmap on top")
