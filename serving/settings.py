"""Server settings, validated by pydantic, rendered into TorchServe's config.properties.

One source of truth: serving/config.properties in the repository is `python -m serving.settings`
with the defaults (a test checks it), the launcher renders the same with its ports, and the
container renders it with --host 0.0.0.0.

    python -m serving.settings [--host 0.0.0.0] [--state-dir DIR] > config.properties
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress

from handlers import constants as C
from handlers.constants import KEY_FILE_NAME, MODEL_NAME, REPO_ROOT


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    host: IPvAnyAddress = Field(default=C.HOST, description="every port binds here; 0.0.0.0 only in a container")
    inference_port: int = Field(default=C.INFERENCE_PORT, ge=1, le=65535)
    management_port: int = Field(default=C.MANAGEMENT_PORT, ge=1, le=65535)
    metrics_port: int = Field(default=C.METRICS_PORT, ge=1, le=65535)
    grpc_inference_port: int = Field(default=C.GRPC_INFERENCE_PORT, ge=1, le=65535)
    grpc_management_port: int = Field(default=C.GRPC_MANAGEMENT_PORT, ge=1, le=65535)
    initial_worker_port: int = Field(default=C.INITIAL_WORKER_PORT, ge=1, le=65535,
                                     description="worker sockets .ts.sock.<port>")
    # Relative paths are relative to the repository root (see resolved()).
    model_store: Path = C.MODEL_STORE.relative_to(REPO_ROOT)
    state_dir: Path = Field(default=C.STATE_DIR.relative_to(REPO_ROOT),
                            description="pid, key file, temp dirs (git-ignored)")
    log_dir: Path = C.LOG_DIR.relative_to(REPO_ROOT)
    max_request_size: int = Field(default=16 * 1024 * 1024, gt=0, description="bytes; larger bodies get 413")
    token_expiration_min: float = Field(default=60, gt=0)
    job_queue_size: int = Field(default=256, ge=1)
    netty_threads: int = Field(default=0, ge=0, description="0 = TorchServe's default (cores)")

    def resolved(self) -> ServeSettings:
        """A copy whose paths are absolute, anchored at the repository root."""
        paths = {k: (REPO_ROOT / v).resolve() for k in ("model_store", "state_dir", "log_dir")
                 if not (v := getattr(self, k)).is_absolute()}
        return self.model_copy(update=paths)

    def url(self, port: int) -> str:
        host = C.HOST if str(self.host) == "0.0.0.0" else str(self.host)
        return f"http://{host}:{port}"

    @property
    def inference_url(self) -> str:
        return self.url(self.inference_port)

    @property
    def management_url(self) -> str:
        return self.url(self.management_port)

    @property
    def metrics_url(self) -> str:
        return self.url(self.metrics_port)

    @property
    def key_file(self) -> Path:
        # TorchServe writes key_file.json into the JVM's user.dir; vmargs points it here.
        return self.state_dir / "keys" / KEY_FILE_NAME

    def ports(self) -> list[int]:
        return [self.inference_port, self.management_port, self.metrics_port, self.grpc_inference_port,
                self.grpc_management_port]

    def properties(self) -> str:
        """config.properties for these settings. Token auth on, model API off, all on `host`."""
        h = str(self.host)
        lines = {
            "inference_address": f"http://{h}:{self.inference_port}",
            "management_address": f"http://{h}:{self.management_port}",
            "metrics_address": f"http://{h}:{self.metrics_port}",
            "grpc_inference_address": h,
            "grpc_inference_port": self.grpc_inference_port,
            "grpc_management_address": h,
            "grpc_management_port": self.grpc_management_port,
            "initial_worker_port": self.initial_worker_port,
            "model_store": self.model_store,
            "load_models": f"{MODEL_NAME}={MODEL_NAME}.mar",
            "disable_token_authorization": "false",
            "token_expiration_min": self.token_expiration_min,
            "enable_model_api": "false",
            "enable_envvars_config": "false",  # no environment variable may loosen the above
            "install_py_dep_per_model": "false",
            "max_request_size": self.max_request_size,
            "max_response_size": self.max_request_size,
            "metrics_mode": "prometheus",
            "model_metrics_auto_detect": "true",  # the handler's Xray* metrics on /metrics
            "job_queue_size": self.job_queue_size,
            "vmargs": f"-Xmx1g -XX:+ExitOnOutOfMemoryError -Duser.dir={self.key_file.parent}",
        }
        if self.netty_threads:
            lines["number_of_netty_threads"] = self.netty_threads
        return "".join(f"{k}={v}\n" for k, v in lines.items())


def read_keys(key_file: Path, attempts: int = 20) -> dict[str, str]:
    """TorchServe's key file -> {"inference": key, "management": key, "API": key}.

    TorchServe writes the file at start-up and rewrites it on rotation, not atomically:
    a half-written file is read again after a moment."""
    for attempt in range(attempts):
        try:
            raw = json.loads(Path(key_file).read_text())
            return {kind: entry["key"] for kind, entry in raw.items()}
        except (ValueError, KeyError, TypeError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def token(kind: str = "inference", key_file: Path | None = None) -> str | None:
    """The bearer token: XRAY_TOKEN (inference) / XRAY_MANAGEMENT_TOKEN, else the key file, else None."""
    env = os.environ.get("XRAY_TOKEN" if kind == "inference" else "XRAY_MANAGEMENT_TOKEN")
    if env:
        return env
    path = Path(os.environ.get("XRAY_KEY_FILE") or key_file or ServeSettings().resolved().key_file)
    return read_keys(path).get(kind) if path.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-store", type=Path)
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--log-dir", type=Path)
    ns = p.parse_args()
    given = {k: v for k, v in vars(ns).items() if v is not None}
    print(ServeSettings(**given).properties(), end="")


if __name__ == "__main__":
    main()
