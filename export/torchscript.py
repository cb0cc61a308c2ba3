"""PyTorch eager model -> TorchScript file with the ModelCard as the extra file CARD_KEY."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from export.cards import card_json
from handlers.backends import CARD_KEY
from handlers.schemas import ModelCard


def export_torchscript(model: torch.nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Script the model (no tracing: nothing about the example batch is baked in) and save it."""
    path = Path(path)
    model = model.eval()
    scripted = torch.jit.script(model)
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={CARD_KEY: card_json(card)})
    os.replace(tmp, path)
    return path
