"""Container HEALTHCHECK: healthy only when the model answers a real radiograph with a label.

The same check as `make serve`'s readiness (serving/readiness.py): the radiograph packed into
the .mar at archive time goes through the gateway with a client token (XRAY_TOKEN_FILE's first,
else the generated key file's) and must come back 200 with a label. `/ping` is no substitute: it
says Healthy before the model is loaded. Exit 0 = healthy, 1 = not (reason on stdout, which
`docker inspect` shows). The image's PYTHONPATH (/app) gives it handlers/ and serving/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, also outside the image

from handlers import constants as C
from serving import readiness
from serving.gateway import read_tokens
from serving.settings import read_keys

STATE_DIR = Path(os.environ.get("XRAY_STATE_DIR", C.CONTAINER_STATE_DIR))
KEY_FILE = STATE_DIR / "keys" / C.KEY_FILE_NAME
MODEL_STORE = Path(os.environ.get("XRAY_MODEL_STORE", C.CONTAINER_MODEL_STORE))
TIMEOUT = float(os.environ.get("XRAY_HEALTHCHECK_TIMEOUT", "15"))


def token(key_file: Path) -> str:
    token_file = os.environ.get(C.TOKEN_FILE_ENV) or str(C.CONTAINER_TOKEN_FILE)
    if Path(token_file).is_file():
        return read_tokens(Path(token_file))[0]
    if not key_file.is_file():
        raise readiness.NotReady(f"no token: no {C.TOKEN_FILE_ENV} file and no key file at {key_file}")
    return read_keys(key_file)["inference"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-url", default=C.INFERENCE_URL)
    p.add_argument("--key-file", type=Path, default=KEY_FILE)
    p.add_argument("--model-store", type=Path, default=MODEL_STORE)
    ns = p.parse_args(argv)
    try:
        probe = readiness.probe_from_mar(ns.model_store / C.MAR_NAME)
        prediction = readiness.check(ns.inference_url, token(ns.key_file), probe, TIMEOUT)
    except Exception as exc:  # any failure to check is "unhealthy", with the reason
        print(f"unhealthy: {type(exc).__name__}: {exc}")
        return 1
    print(f"healthy: {prediction.model} {prediction.version} backend={prediction.backend} "
          f"device={prediction.device} probe={prediction.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
