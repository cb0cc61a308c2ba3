"""What TorchServe's own formats look like, read in one place (standard library, plus PyYAML on demand).

- the management API's description of a model -> its workers, and whether one is READY;
- a .mar archive -> its MAR-INF/MANIFEST.json and its model-config.yaml.

Used by the launcher, the container's health check and test, the soak and the tests alike.
"""

from __future__ import annotations

import http.client
import json
import socket
import zipfile
from pathlib import Path
from typing import Any

from handlers.constants import MANIFEST_PATH, MODEL_NAME

READY = "READY"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: TorchServe's management API listens on one (never on TCP)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def management_request(management_socket: Path, token: str | None, method: str, path: str,
                       timeout: float = 10) -> tuple[int, bytes]:
    """One request to TorchServe's management API on its unix socket: (status, body)."""
    conn = _UnixHTTPConnection(management_socket, timeout)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def list_workers(management_socket: Path, token: str | None, model: str = MODEL_NAME,
                 timeout: float = 10) -> list[dict[str, Any]]:
    """The model's workers (id, pid, status, ...) as `GET /models/<model>` lists them.

    [] when the API answers anything but 200 (not registered yet, wrong token). A server that
    does not answer at all raises OSError (ConnectionError, FileNotFoundError, TimeoutError)."""
    status, body = management_request(management_socket, token, "GET", f"/models/{model}", timeout)
    if status != 200:
        return []
    try:
        return list(json.loads(body)[0].get("workers", []))
    except (ValueError, IndexError, KeyError, AttributeError, TypeError):
        return []


def is_ready(workers: list[dict[str, Any]]) -> bool:
    """At least one worker can take requests. `/ping` is no substitute: it says Healthy before
    the model is loaded and while its workers crash-loop."""
    return any(w.get("status") == READY for w in workers)


def worker_statuses(workers: list[dict[str, Any]]) -> str:
    return ", ".join(str(w.get("status", "?")) for w in workers) or "no worker listed"


def read_manifest(mar: Path) -> dict[str, Any]:
    """MAR-INF/MANIFEST.json of a .mar (a zip); its "model" holds modelName, serializedFile, configFile."""
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read(MANIFEST_PATH))


def read_model_config(mar: Path) -> dict[str, Any]:
    """The model-config.yaml a .mar carries (batchSize, workers, our `handler:` section); {} without one."""
    import yaml

    name = read_manifest(mar).get("model", {}).get("configFile")
    if not name:
        return {}
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read(name)) or {}
