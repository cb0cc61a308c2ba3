"""PyTorch eager model -> one self-contained ONNX file (dynamic batch) with the ModelCard as metadata."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch

from export.cards import card_json
from handlers.backends import CARD_KEY, INPUT_NAME, OOD_OUTPUT, OUTPUT_NAME
from handlers.schemas import ModelCard

OPSET = 18  # the dynamo exporter's native opset; onnxruntime 1.31 runs up to 23


def export_onnx(model: torch.nn.Module, card: ModelCard, path: str | Path, opset: int = OPSET) -> Path:
    """Write PATH (no .onnx.data side file): input 'image' [N, 1, S, S] float32, output 'logits', and
    'ood_score' [N] when the card has an OOD gate (then MODEL is training.ood.Guarded)."""
    path = Path(path)
    model = model.eval()
    example = torch.zeros(2, 1, card.input_size, card.input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    outputs = [OUTPUT_NAME, OOD_OUTPUT] if card.ood is not None else [OUTPUT_NAME]
    tmp = path.with_name(path.name + ".tmp")
    # The exporter is chatty (e.g. "torchvision is not installed"), about things that do not concern us.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=outputs,
                                    opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},),
                                    external_data=False, verbose=False)
    proto = program.model_proto
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, card_json(card)
    proto.producer_name = "xray-serve"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)
    return path
