"""The deployment's constants, in one torch-free place: model name, ports and URLs, paths, archive defaults.

Every CLI, script, health check and test reads these; shell and Makefile read them with

    python -m handlers.constants NAME        # e.g. INFERENCE_PORT -> 8080, MODEL_STORE -> /abs/model_store

Standard library only: it is imported by the container's health check and packed into the .mar
with the rest of handlers/ (where REPO_ROOT is meaningless and unused).
"""

from __future__ import annotations

import sys
from pathlib import Path

MODEL_NAME = "xray"
MAR_NAME = f"{MODEL_NAME}.mar"

# TorchServe's own defaults; tests and manual runs pick other ports through ServeSettings.
# The gateway (nginx) listens on these; TorchServe's inference, management and metrics APIs are
# unix sockets behind it (never published), its gRPC ports on 127.0.0.1 behind its own keys.
HOST = "127.0.0.1"
INFERENCE_PORT = 8080
METRICS_PORT = 8082
GRPC_INFERENCE_PORT = 7070
GRPC_MANAGEMENT_PORT = 7071
INITIAL_WORKER_PORT = 9000
INFERENCE_URL = f"http://{HOST}:{INFERENCE_PORT}"
METRICS_URL = f"http://{HOST}:{METRICS_PORT}"
KEY_FILE_NAME = "key_file.json"  # TorchServe's name; ours (the gateway's token) has the same format
TOKEN_FILE_ENV = "XRAY_TOKEN_FILE"  # clients' bearer tokens, one a line, re-read on change
CONTENT_TYPE_HEADER = "x-xray-content-type"  # the client's Content-Type, as the gateway forwards it
READINESS_PROBE_NAME = "readiness_probe"  # the radiograph packed into the .mar for readiness checks

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "chest_xray"  # DATA_DIR in the environment wins
ARTIFACTS = REPO_ROOT / "artifacts"
CACHE_DIR = ARTIFACTS / "cache"
RUNS_DIR = ARTIFACTS / "runs"
BEST_DIR = ARTIFACTS / "best"
EXPORT_DIR = ARTIFACTS / "export"
MODEL_STORE = REPO_ROOT / "model_store"
REPORTS_DIR = REPO_ROOT / "reports"
STATE_DIR = REPO_ROOT / ".serve"  # sockets, pid files, keys, temp dirs of a local server (0700)
LOG_DIR = REPO_ROOT / "logs"

# Inside the container (the Dockerfile's ENV says the same for entrypoint.sh).
CONTAINER_STATE_DIR = Path("/var/lib/xray")
CONTAINER_LOG_DIR = Path("/var/log/xray")
CONTAINER_MODEL_STORE = Path("/app/model_store")
CONTAINER_TOKEN_FILE = Path("/var/run/secrets/xray/token")
IMAGE = "xray-serve:latest"

# The archive (export.archive). Defaults tuned with `make bench` on the 2-core CPU machine (README,
# "Tuning"): two single-threaded workers keep both cores busy; a 2 ms delay keeps a lone request
# fast while a queue still fills batches of 8 at once. On a GPU host: one worker per GPU, threads 0.
DEFAULT_FAMILY = "xraynet"  # our CNN; "cnn" is the course CNN architecture
DEFAULT_BACKEND = "onnxruntime"
MODEL_SUFFIX = {"onnxruntime": ".onnx", "torchscript": ".torchscript.pt"}
MANIFEST_PATH = "MAR-INF/MANIFEST.json"
MODEL_CONFIG_NAME = "model-config.yaml"
EXPLAINER_NAME = "explainer.pt"  # the TorchScript model every archive carries for Grad-CAM
BATCH_SIZE = 8
MAX_BATCH_DELAY_MS = 2
WORKERS = 2
WORKER_THREADS = 1
RESPONSE_TIMEOUT_S = 60


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    values = {k: v for k, v in globals().items() if k.isupper()}
    unknown = [n for n in names if n not in values]
    if not names or unknown:
        print(f"usage: python -m handlers.constants NAME...; unknown {unknown}; names: {' '.join(values)}",
              file=sys.stderr)
        return 2
    for n in names:
        print(values[n])
    return 0


if __name__ == "__main__":
    sys.exit(main())
