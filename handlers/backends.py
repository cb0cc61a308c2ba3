"""Runners for exported models: ONNX Runtime or TorchScript, on CUDA when there is one.

A runner maps a float32 batch [N, 1, H, W] to logits [N, 1] (BCE head) or [N, 2] (CE head);
`pneumonia_probability` turns either into the uncalibrated P(PNEUMONIA). `runner.run(batch)` gives
the logits and the out-of-distribution score [N] that models exported with a detector output as
well (None for a model without one); handlers/trust.py turns both into the served answer. The
model's ModelCard rides inside the file (ONNX metadata_props / TorchScript extra file) and is read
back here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from handlers.schemas import Backend, Head, ModelCard

log = logging.getLogger(__name__)

CARD_KEY = "xray_card"  # ONNX metadata_props key and TorchScript extra-file name
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OOD_OUTPUT = "ood_score"


class ModelFileError(RuntimeError):
    """A model file that is missing, corrupt, or not one of ours."""


def pneumonia_probability(logits: np.ndarray, head: Head) -> np.ndarray:
    """Logits [N, 1] (sigmoid) or [N, 2] (softmax) -> P(PNEUMONIA) as float64 [N]."""
    logits = np.asarray(logits, dtype=np.float64)
    expected = 1 if head == "bce" else 2
    if logits.ndim != 2 or logits.shape[1] != expected:
        raise ValueError(f"{head} head expects logits [N, {expected}], got {logits.shape}")
    # softmax(l)[1] == sigmoid(l1 - l0): both heads reduce to the sigmoid of a margin.
    margin = logits[:, 0] if head == "bce" else logits[:, 1] - logits[:, 0]
    return 1.0 / (1.0 + np.exp(-np.clip(margin, -500.0, 500.0)))


class Runner(Protocol):
    card: ModelCard
    backend: Backend
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


class OnnxRunner:
    backend: Backend = "onnxruntime"

    def __init__(self, path: str | Path, gpu_id: int | None = None, threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ORT's pool spin-waits between runs by default: on a CPU server it steals the cores that
        # TorchServe's frontend and the other workers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        # gpu_id comes from TorchServe, which assigns one only where it found a GPU; torch's view
        # does not matter here (the container's torch is the CPU build).
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ModelFileError(f"{path} is not a loadable ONNX model: {exc}") from exc
        # ORT silently falls back to the CPU when CUDA cannot start: report what really runs.
        self.providers = self.session.get_providers()
        self.device = f"cuda:{gpu_id}" if "CUDAExecutionProvider" in self.providers else "cpu"
        meta = self.session.get_modelmeta().custom_metadata_map
        self.card = _parse_card(meta.get(CARD_KEY), path)
        self._check_io(path)

    def _check_io(self, path: Path) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or outputs[0].name != OUTPUT_NAME:
            raise ModelFileError(f"{path}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}'")
        self.outputs = [o.name for o in outputs]
        if self.card.ood is not None and OOD_OUTPUT not in self.outputs:
            raise ModelFileError(f"{path}: the card has an OOD gate but the model has no '{OOD_OUTPUT}' output")
        shape = inputs[0].shape
        size = self.card.input_size
        if len(shape) != 4 or list(shape[1:]) != [1, size, size]:
            raise ModelFileError(f"{path}: input shape {shape} does not match card input_size {size}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(self.outputs, {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})
        return out[0], (out[self.outputs.index(OOD_OUTPUT)] if OOD_OUTPUT in self.outputs else None)


class TorchScriptRunner:
    backend: Backend = "torchscript"

    def __init__(self, path: str | Path, gpu_id: int | None = None, threads: int = 0) -> None:
        import torch

        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"TorchScript model not found: {path}")
        self.device = f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
        extra = {CARD_KEY: ""}
        try:
            self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra).eval()
        except Exception as exc:
            raise ModelFileError(f"{path} is not a loadable TorchScript model: {exc}") from exc
        if threads:
            torch.set_num_threads(threads)
        self.card = _parse_card(extra[CARD_KEY] or None, path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            out = self.module(x)
        # A model exported with its OOD detector returns (logits, ood_score); a plain one, the logits.
        if isinstance(out, tuple | list):
            return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()
        if self.card.ood is not None:
            raise ModelFileError(f"the card has an OOD gate but the TorchScript model returns no '{OOD_OUTPUT}'")
        return out.float().cpu().numpy(), None


def _parse_card(raw: str | bytes | None, path: Path) -> ModelCard:
    if not raw:
        raise ModelFileError(f"{path} carries no '{CARD_KEY}' metadata: was it written by `make export`?")
    try:
        return ModelCard.model_validate(json.loads(raw))
    except Exception as exc:
        raise ModelFileError(f"{path}: its '{CARD_KEY}' metadata is invalid: {exc}") from exc


def load_runner(
    path: str | Path, backend: Backend | None = None, gpu_id: int | None = None, threads: int = 0
) -> Runner:
    """Open an exported model; the backend follows the file suffix unless given."""
    path = Path(path)
    backend = backend or ("onnxruntime" if path.suffix == ".onnx" else "torchscript")
    runner_cls = OnnxRunner if backend == "onnxruntime" else TorchScriptRunner
    runner = runner_cls(path, gpu_id=gpu_id, threads=threads)
    log.info("loaded %s with %s on %s", path.name, backend, runner.device)
    return runner
