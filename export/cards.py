"""The card an exported file carries: the checkpoint's card + its sha256 + library versions."""

from __future__ import annotations

import hashlib
from pathlib import Path

from handlers.schemas import ModelCard


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_card(card: ModelCard, checkpoint: str | Path) -> ModelCard:
    """The checkpoint's card (threshold, normalisation, metrics kept) stamped for export."""
    return card.model_copy(update={"checkpoint_sha256": sha256_file(checkpoint),
                                   "versions": {**card.versions, **library_versions()}})


def card_json(card: ModelCard) -> str:
    return card.model_dump_json()
