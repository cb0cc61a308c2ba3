"""Container HEALTHCHECK: healthy only when the model really answers.

`/ping` says Healthy before the model is loaded (and while its worker crash-loops), so this
checks (1) the management API, authorised with the key file's management token, lists a READY
worker for the model, and (2) a real prediction of a small synthetic radiograph answers 200 with a
body that validates as handlers.schemas.Prediction. Exit 0 = healthy, 1 = not (reason on stdout,
which `docker inspect` shows). The image's PYTHONPATH (/app) gives it handlers/ (constants,
TorchServe's worker list) and serving.settings (the key file reader).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, also outside the image

from handlers import constants as C
from handlers.torchserve import is_ready, list_workers, worker_statuses
from serving.settings import read_keys

KEY_FILE = Path(os.environ.get("XRAY_STATE_DIR", C.CONTAINER_STATE_DIR)) / "keys" / C.KEY_FILE_NAME
TIMEOUT = float(os.environ.get("XRAY_HEALTHCHECK_TIMEOUT", "15"))


def _request(url: str, token: str, body: bytes) -> tuple[int, bytes]:
    # urllib's default form content type would make TorchServe parse the image as a form
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def probe_png() -> bytes:
    import numpy as np
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (224, 224), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def check(inference_url: str = C.INFERENCE_URL, management_url: str = C.MANAGEMENT_URL,
          key_file: Path = KEY_FILE) -> str | None:
    """None when healthy, else the reason."""
    if not key_file.is_file():
        return f"no key file yet at {key_file}"
    keys = read_keys(key_file)
    workers = list_workers(management_url, keys["management"], timeout=TIMEOUT)
    if not is_ready(workers):
        return f"no READY worker ({worker_statuses(workers)})"
    code, body = _request(f"{inference_url}/predictions/{C.MODEL_NAME}", keys["inference"], probe_png())
    if code != 200:
        return f"probe prediction answered {code}: {body[:200]!r}"
    from handlers.schemas import Prediction

    pred = Prediction.model_validate_json(body)
    print(f"healthy: {pred.model} {pred.version} backend={pred.backend} device={pred.device}")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-url", default=C.INFERENCE_URL)
    p.add_argument("--management-url", default=C.MANAGEMENT_URL)
    p.add_argument("--key-file", type=Path, default=KEY_FILE)
    ns = p.parse_args(argv)
    try:
        reason = check(ns.inference_url, ns.management_url, ns.key_file)
    except Exception as exc:  # any failure to check is "unhealthy", with the reason
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        print(f"unhealthy: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
