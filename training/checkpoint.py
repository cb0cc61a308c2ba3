"""The checkpoint file of a run (best.pt): what it holds, how it is written and read back.

A plain dict of tensors and JSON-able values, so it loads with torch.load(weights_only=True):
nothing in it is unpickled code. Export imports this module, never the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from handlers.schemas import ModelCard
from training.models import build_model

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, card: ModelCard, config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                    history: list[dict[str, Any]]) -> Path:
    path = Path(path)
    torch.save({"format": CHECKPOINT_FORMAT, "card": card.model_dump(mode="json"), "config": config,
                "state_dict": state_dict, "history": history}, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[ModelCard, torch.nn.Module, dict[str, Any]]:
    """A best.pt -> (card, model in eval mode, the whole checkpoint). Never unpickles code."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an xray-serve checkpoint (format {ckpt.get('format')!r})")
    card = ModelCard.model_validate(ckpt["card"])
    model = build_model(card.arch, card.head, card.input_size, card.arch_args)
    model.load_state_dict(ckpt["state_dict"])
    return card, model.eval(), ckpt
