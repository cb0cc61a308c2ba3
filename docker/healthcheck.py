"""Container HEALTHCHECK: healthy only when the model answers a real radiograph with a label.

The same check as `make serve`'s readiness (serving/readiness.py): the radiograph packed into
the .mar at archive time goes through the gateway with a client token (the token file's first,
else the generated key file's) and must come back 200 with a label. Exit 0 = healthy, 1 = not
(reason on stdout, which `docker inspect` shows).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, "/app")

from serving import readiness
from serving.gateway import read_tokens
from serving.settings import read_keys

STATE_DIR = Path(os.environ.get("XRAY_STATE_DIR", "/var/lib/xray"))
MODEL_STORE = Path(os.environ.get("XRAY_MODEL_STORE", "/app/model_store"))
TIMEOUT = float(os.environ.get("XRAY_HEALTHCHECK_TIMEOUT", "15"))
URL = os.environ.get("XRAY_HEALTHCHECK_URL", "http://127.0.0.1:8080")


def token() -> str | None:
    token_file = os.environ.get("XRAY_TOKEN_FILE")
    if token_file and Path(token_file).is_file():
        return read_tokens(Path(token_file))[0]
    key_file = STATE_DIR / "keys" / "key_file.json"
    return read_keys(key_file)["inference"] if key_file.is_file() else None


def main() -> int:
    try:
        prediction = readiness.check(URL, token(), readiness.probe_from_mar(
            MODEL_STORE / "xray.mar"), TIMEOUT)
    except Exception as exc:  # any failure to check is "unhealthy", with the reason
        print(f"unhealthy: {type(exc).__name__}: {exc}")
        return 1
    print(f"healthy: {prediction.model} {prediction.version} backend={prediction.backend} "
          f"device={prediction.device} probe={prediction.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
