"""Plain helpers for the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from handlers.backends import CARD_KEY, INPUT_NAME, OUTPUT_NAME
from handlers.constants import REPO_ROOT as REPO
from handlers.schemas import ModelCard
from serving.settings import ServeSettings, read_keys

CLASSES = ("NORMAL", "PNEUMONIA")


def synthetic_xray(label: int, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """A chest-like uint8 image: two dark lung fields; PNEUMONIA adds bright hazy patches."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.15 * yy + rng.normal(0, 0.04, (size, size))
    for cx in (0.32, 0.68):
        img -= 0.4 * np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    if label == 1:
        for _ in range(rng.integers(2, 5)):
            cx, cy = rng.choice([0.32, 0.68]) + rng.normal(0, 0.05), rng.uniform(0.35, 0.7)
            img += 0.3 * np.exp(-(((xx - cx) / 0.07) ** 2 + ((yy - cy) / 0.07) ** 2))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_image_folder(root: Path, counts: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for label, n in enumerate(per_class):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(synthetic_xray(label, rng)).save(folder / f"synth-{i:04d}.jpeg", quality=95)
    return root


def png_bytes(arr: np.ndarray, **save_args: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save_args)
    return buf.getvalue()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m ...` as a user would; fail the test with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        pytest.fail(f"python -m {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return proc


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def serve_settings(root: Path, model_store: Path, **overrides: object) -> ServeSettings:
    ports = free_ports(5)
    return ServeSettings(inference_port=ports[0], metrics_port=ports[1],
                         grpc_inference_port=ports[2], grpc_management_port=ports[3],
                         initial_worker_port=ports[4] + 20000 if ports[4] < 40000 else ports[4] - 20000,
                         model_store=model_store, state_dir=root / "state", log_dir=root / "logs", **overrides)


def keys(settings: ServeSettings) -> dict[str, str]:
    """The client's key file: {"inference": the gateway's bearer token}."""
    return read_keys(settings.key_file)


def workers(settings: ServeSettings) -> list[dict]:
    """The model's workers as the management API (unix socket) lists them (id, pid, status, ...)."""
    from serving.launcher import list_workers

    return list_workers(settings)


def linear_onnx(path: Path, card: ModelCard, weights: np.ndarray) -> Path:
    """image [N, 1, S, S] -> Flatten -> Gemm(weights) -> logits [N, 2], the card in the metadata: a
    served model whose answers a test can compute by hand."""
    size = card.input_size
    graph = helper.make_graph(
        [helper.make_node("Flatten", [INPUT_NAME], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "w"], [OUTPUT_NAME])],
        "tiny", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, {CARD_KEY: card.model_dump_json()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
