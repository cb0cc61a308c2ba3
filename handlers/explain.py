"""Grad-CAM: where the CNN looked, for a chosen class, from the TorchScript model (ONNX has no gradients).

The CNNs export forward_features (up to the last conv block) and forward_head; Grad-CAM
weighs each feature map by the mean gradient of the class score, keeps the positive part,
and upsamples to the model's input size. The class score is the P(PNEUMONIA) logit margin
(or its negative for NORMAL), the same quantity for BCE and CE heads.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from handlers.schemas import Head


class NotExplainable(RuntimeError):
    """The model has no conv feature maps (an MLP) or no explainer file."""


def load_explainer(path: Path, device: str) -> object:
    import torch

    module = torch.jit.load(str(path), map_location=device).eval()
    if not (hasattr(module, "forward_features") and hasattr(module, "forward_head")):
        raise NotExplainable("Grad-CAM needs a CNN: this model has no forward_features/forward_head")
    return module


def grad_cam(module: object, batch: np.ndarray, head: Head, targets: list[int], device: str = "cpu") -> np.ndarray:
    """Float32 [N, 1, H, W] inputs, class index per input -> heatmaps [N, H, W] in [0, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(device)
    with torch.enable_grad():
        feats = module.forward_features(x).detach().requires_grad_(True)
        logits = module.forward_head(feats)
        margin = logits[:, 0] if head == "bce" else logits[:, 1] - logits[:, 0]
        sign = torch.tensor([1.0 if t == 1 else -1.0 for t in targets], device=margin.device)
        (grads,) = torch.autograd.grad((margin * sign).sum(), feats)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return (cam / peak).detach().cpu().numpy().astype(np.float32)


def overlay_png(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> str:
    """Base64 PNG: the grayscale input with the heatmap in the 'jet' colours on top."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    base = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)
    rgb = ((1 - alpha) * base + alpha * heat) * 255
    buf = io.BytesIO()
    Image.fromarray(rgb.round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
