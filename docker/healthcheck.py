"""Container HEALTHCHECK: healthy only when the model really answers.

`/ping` says Healthy before the model is loaded (and while its worker crash-loops), so this
checks (1) the management API, authorised with the key file's management token, lists a READY
worker for "xray", and (2) a real prediction of a small synthetic radiograph answers 200 with a
body that validates as handlers.schemas.Prediction. Exit 0 = healthy, 1 = not (reason on stdout,
which `docker inspect` shows). Standard library + pillow/numpy/pydantic from the image.
"""

from __future__ import annotations

import io
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

MODEL = "xray"
STATE_DIR = Path(os.environ.get("XRAY_STATE_DIR", "/var/lib/xray"))
KEY_FILE = STATE_DIR / "keys" / "key_file.json"
TIMEOUT = float(os.environ.get("XRAY_HEALTHCHECK_TIMEOUT", "15"))


def _request(url: str, token: str, body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:  # urllib's default form content type would make TorchServe parse the image as a form
        headers["Content-Type"] = "application/octet-stream"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
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


def check() -> str | None:
    """None when healthy, else the reason."""
    if not KEY_FILE.is_file():
        return f"no key file yet at {KEY_FILE}"
    keys = {kind: entry["key"] for kind, entry in json.loads(KEY_FILE.read_text()).items()}
    code, body = _request(f"http://127.0.0.1:8081/models/{MODEL}", keys["management"])
    if code != 200:
        return f"management API answered {code}: {body[:200]!r}"
    workers = json.loads(body)[0].get("workers", [])
    if not any(w.get("status") == "READY" for w in workers):
        return f"no READY worker: {[w.get('status') for w in workers]}"
    code, body = _request(f"http://127.0.0.1:8080/predictions/{MODEL}", keys["inference"], probe_png())
    if code != 200:
        return f"probe prediction answered {code}: {body[:200]!r}"
    from handlers.schemas import Prediction

    pred = Prediction.model_validate_json(body)
    print(f"healthy: {pred.model} {pred.version} backend={pred.backend} device={pred.device}")
    return None


def main() -> int:
    try:
        reason = check()
    except Exception as exc:  # any failure to check is "unhealthy", with the reason
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        print(f"unhealthy: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
