"""Server settings, validated by pydantic, rendered into TorchServe's config.properties.

One source of truth: serving/config.properties in the repository is `python -m serving.settings`
with the defaults (a test checks it), the launcher renders the same with its paths, and the
container renders it with --host 0.0.0.0.

Clients never reach TorchServe itself: an nginx gateway (serving/gateway.py) listens on
`host`:inference_port and `host`:metrics_port and forwards to TorchServe's inference and
metrics APIs on unix sockets inside the private state dir; the management API is only on a
unix socket there too, so no client, whatever token it holds, can change the worker count.

    python -m serving.settings [--host 0.0.0.0] [--state-dir DIR] > config.properties
    python -m serving.settings --extract-netty-native DIR   # the image, at build time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress

from handlers import constants as C
from handlers.constants import KEY_FILE_NAME, MODEL_NAME, REPO_ROOT

# TorchServe's internal keys live as long as the server: only the gateway and launcher hold them.
TS_TOKEN_EXPIRATION_MIN = 60 * 24 * 365
LOG_FILES = ("access_log", "model_log", "model_metrics", "ts_log", "ts_metrics")
# (logger, level, file): access lines at info; the worker's stdout/stderr (MODEL_LOG) at info so
# its tracebacks stay; nothing reaches the console (torchserve.out holds start-up and crashes only).
LOGGERS = (("ACCESS_LOG", "info", "access_log"), ("MODEL_LOG", "info", "model_log"),
           ("MODEL_METRICS", "info", "model_metrics"), ("org.pytorch.serve", "info", "ts_log"),
           ("TS_METRICS", "info", "ts_metrics"))

# TorchServe's frontend logs, at INFO, a line per response sent, two per batch (its timing) and an echo
# of every metric line a worker prints; the raw message (before formatting) is matched, so a dropped
# line costs no formatting. Lifecycle lines (workers started, died, retried) stay.
ROUTINE_MESSAGES = ("Sending response for jobId", "result=", "Looping backend response at", "Backend response time")
ROUTINE_FILTER = ('<RegexFilter regex="^(' + "|".join(m.replace(" ", "\\s") for m in ROUTINE_MESSAGES)
                  + ').*" useRawMsg="true" onMatch="DENY" onMismatch="NEUTRAL"/>')

# The server's ports, in the order a port base numbers them (bench, abtest) and the launcher takes them.
PORT_FIELDS = ("inference_port", "metrics_port", "grpc_inference_port", "grpc_management_port", "initial_worker_port")


def port_settings(ports: Sequence[int]) -> dict[str, int]:
    """PORT_FIELDS given PORTS in that order, e.g. range(base, base + len(PORT_FIELDS))."""
    return dict(zip(PORT_FIELDS, ports, strict=True))


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    host: IPvAnyAddress = Field(default=C.HOST, description="the gateway binds here; 0.0.0.0 only in a container")
    inference_port: int = Field(default=C.INFERENCE_PORT, ge=1, le=65535, description="the gateway's inference port")
    metrics_port: int = Field(default=C.METRICS_PORT, ge=1, le=65535, description="the gateway's /metrics port")
    grpc_inference_port: int = Field(default=C.GRPC_INFERENCE_PORT, ge=1, le=65535)
    grpc_management_port: int = Field(default=C.GRPC_MANAGEMENT_PORT, ge=1, le=65535)
    initial_worker_port: int = Field(default=C.INITIAL_WORKER_PORT, ge=1, le=65535,
                                     description="worker sockets .ts.sock.<port>")
    # Relative paths are relative to the repository root (see resolved()).
    model_store: Path = C.MODEL_STORE.relative_to(REPO_ROOT)
    state_dir: Path = Field(default=C.STATE_DIR.relative_to(REPO_ROOT),
                            description="sockets, pid files, keys, temp dirs (git-ignored, 0700)")
    log_dir: Path = C.LOG_DIR.relative_to(REPO_ROOT)
    max_request_size: int = Field(default=16 * 1024 * 1024, gt=0, description="bytes; larger bodies get 413")
    job_queue_size: int = Field(default=256, ge=1)
    # One HTTP event loop is plenty behind the gateway (its 32 keep-alive connections) and cost
    # less than one per core on 2 cores (`make bench`, README "Tuning"); 0 = TorchServe's default (cores).
    netty_threads: int = Field(default=1, ge=0, description="netty's HTTP event loops")
    netty_client_threads: int = Field(default=0, ge=0, description="netty's event loops for the worker sockets; "
                                      "0 = TorchServe's default (cores)")
    # The gateway's budget. The Java frontend holds every body it is sent (netty's aggregate,
    # then the job's copy), so the heap is sized from what the gateway lets through at once.
    max_inflight: int = Field(default=64, ge=1, description="requests past the gateway at once; more -> 503")
    max_large_inflight: int = Field(default=8, ge=1, description="of those, bodies >= large_body_bytes")
    large_body_bytes: int = Field(default=1_000_000, ge=1)
    max_connections: int = Field(default=4096, ge=64, description="open client connections (idle ones are "
                                 "closed first when the gateway runs out)")
    client_timeout_s: int = Field(default=10, ge=1, description="header, body-read gap and idle keep-alive")
    upstream_timeout_s: int = Field(default=60, ge=1, description="one request inside TorchServe")
    drain_timeout_s: int = Field(default=30, ge=1, description="`stop` waits this long for in-flight requests")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of a 503")
    token_file: Path | None = Field(default=None, description="bearer tokens, one a line, re-read on change "
                                    "(env XRAY_TOKEN_FILE); None: one is generated into key_file")
    log_max_mb: int = Field(default=10, ge=1, description="each log file rolls over at this size")
    log_backups: int = Field(default=5, ge=1)
    # Levers measured with `make bench` / serving.abtest (README, "Tuning").
    access_log: bool = Field(default=True, description="TorchServe's access log: one line per request")
    routine_logs: bool = Field(default=False, description="TorchServe's per-request and per-batch INFO lines "
                               "(responses sent, batch timings, each metric line echoed); off by default, "
                               "lifecycle lines stay either way")
    java_gc: Literal["serial", "g1"] = Field(default="serial", description="the JVM's collector: serial on a "
                                             "small host (2 cores), g1 on a large one")
    jvm_options: str = Field(default="", pattern=r"^[-A-Za-z0-9:+=._ ]*$", description="extra JVM flags")
    java_library_path: Path | None = Field(
        default=None, description="netty's native transports, extracted beforehand (extract_netty_native); "
        "None: netty extracts them into TEMP at each start, which fails where TEMP is mounted noexec")

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
    def metrics_url(self) -> str:
        return self.url(self.metrics_port)

    @property
    def key_file(self) -> Path:
        """The gateway's bearer token for clients ({"inference": {"key": ...}}, TorchServe's format)."""
        return self.state_dir / "keys" / KEY_FILE_NAME

    @property
    def ts_key_file(self) -> Path:
        # TorchServe's own keys (it writes key_file.json into the JVM's user.dir; vmargs points it
        # here): the gateway and the launcher use them, no client ever sees them. They guard the
        # gRPC ports, which TorchServe always opens on TCP.
        return self.state_dir / "ts" / KEY_FILE_NAME

    @property
    def run_dir(self) -> Path:
        """Unix sockets, pid files, the gateway's config and body buffers (mode 0700)."""
        return self.state_dir / "run"

    def socket(self, api: str) -> Path:
        return self.run_dir / f"ts.{api}.sock"

    @property
    def heap_mb(self) -> int:
        """-Xmx: 256 MiB for TorchServe itself + 3 copies of every body the gateway lets in at once."""
        small = self.max_inflight * self.large_body_bytes
        large = self.max_large_inflight * self.max_request_size
        return 256 + -(-3 * (small + large) // 2**20)

    def ports(self) -> list[int]:
        return [self.inference_port, self.metrics_port, self.grpc_inference_port, self.grpc_management_port]

    def properties(self) -> str:
        """config.properties for TorchServe behind the gateway: HTTP APIs on unix sockets, token
        auth on, model API off, gRPC on 127.0.0.1 whatever `host` is (only the gateway is published)."""
        lines = {
            "inference_address": f"unix:{self.socket('inference')}",
            "management_address": f"unix:{self.socket('management')}",
            "metrics_address": f"unix:{self.socket('metrics')}",
            "use_native_io": "true",  # unix sockets need netty's epoll transport
            "grpc_inference_address": "127.0.0.1",
            "grpc_inference_port": self.grpc_inference_port,
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": self.grpc_management_port,
            "initial_worker_port": self.initial_worker_port,
            "model_store": self.model_store,
            "load_models": f"{MODEL_NAME}={MODEL_NAME}.mar",
            "disable_token_authorization": "false",
            "token_expiration_min": TS_TOKEN_EXPIRATION_MIN,
            "enable_model_api": "false",
            "enable_envvars_config": "false",  # no environment variable may loosen the above
            "install_py_dep_per_model": "false",
            "max_request_size": self.max_request_size,
            "max_response_size": self.max_request_size,
            "metrics_mode": "prometheus",
            "model_metrics_auto_detect": "true",  # the handler's Xray* metrics on /metrics
            "job_queue_size": self.job_queue_size,
            # A heap exhausted anyway exits at once; the launcher's supervisor starts a new server.
            # C1 only (TieredStopAtLevel=1): C2's compiler threads cost more CPU per request than the
            # frontend's own work for minutes after a start on a 2-core host. The serial collector
            # (what the JVM itself picks below 2 cores or 1.8 GB): G1's concurrent threads cost more
            # per request than its pauses save at this heap size (`make bench`, README "Tuning").
            "vmargs": f"-Xmx{self.heap_mb}m -XX:+ExitOnOutOfMemoryError -XX:TieredStopAtLevel=1 "
                      f"-XX:+Use{'Serial' if self.java_gc == 'serial' else 'G1'}GC "
                      f"-Duser.dir={self.ts_key_file.parent}"
                      + (f" -Djava.library.path={self.java_library_path}" if self.java_library_path else "")
                      + (f" {self.jvm_options.strip()}" if self.jvm_options.strip() else ""),
        }
        if self.netty_threads:
            lines["number_of_netty_threads"] = self.netty_threads
        if self.netty_client_threads:
            lines["netty_client_threads"] = self.netty_client_threads
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def log4j2(self) -> str:
        """TorchServe's log4j2 config: every log rolls over at log_max_mb and keeps log_backups
        files (TorchServe's own sends every access and debug line to stdout too, unbounded)."""
        appenders = "".join(
            f'  <RollingFile name="{name}" fileName="{self.log_dir}/{name}.log" '
            f'filePattern="{self.log_dir}/{name}.%i.log.gz">\n'
            '   <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>\n'
            f'   <Policies><SizeBasedTriggeringPolicy size="{self.log_max_mb} MB"/></Policies>\n'
            f'   <DefaultRolloverStrategy max="{self.log_backups}"/>\n  </RollingFile>\n' for name in LOG_FILES)
        levels = {"ACCESS_LOG": "info" if self.access_log else "off"}
        routine = "" if self.routine_logs else ROUTINE_FILTER
        loggers = "".join(f'  <Logger name="{logger}" level="{levels.get(logger, level)}" additivity="false">'
                          f'{routine if logger == "org.pytorch.serve" else ""}<AppenderRef ref="{name}"/></Logger>\n'
                          for logger, level, name in LOGGERS)
        return ('<?xml version="1.0" encoding="UTF-8"?>\n<Configuration>\n <Appenders>\n'
                f'{appenders} </Appenders>\n <Loggers>\n{loggers}'
                '  <Logger name="io.netty" level="error"/>\n  <Logger name="org.apache" level="off"/>\n'
                '  <Root level="warn"><AppenderRef ref="ts_log"/></Root>\n </Loggers>\n</Configuration>\n')


def extract_netty_native(dest: Path, jar: Path | None = None) -> list[Path]:
    """Copy the netty epoll transports for this CPU out of TorchServe's jar into dest.

    The unix sockets need netty's epoll transport, a .so inside the jar that netty otherwise copies
    into java.io.tmpdir and loads from there at every start. In a container whose writable dirs
    are noexec tmpfs (`docker run --read-only --tmpfs ...`) that load fails, TorchServe rejects its
    configuration ("Invalid configuration: null") and exits 0. Netty first looks on
    java.library.path, so the image extracts them once, at build time, onto its read-only root."""
    if jar is None:
        import ts  # the serving environment's TorchServe; imported here so settings alone stays light

        jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch_64",
            "arm64": "aarch_64"}[platform.machine().lower()]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with zipfile.ZipFile(jar) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.startswith("META-INF/native/") and "netty_transport_native_epoll" in base \
                    and base.endswith(f"_{arch}.so"):
                (dest / base).write_bytes(z.read(name))
                out.append(dest / base)
    if not any(p.name == f"libnetty_transport_native_epoll_{arch}.so" for p in out):
        raise FileNotFoundError(f"{jar}: no netty epoll transport for {arch}")
    return sorted(out)


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
    p.add_argument("--java-library-path", type=Path)
    p.add_argument("--extract-netty-native", type=Path, metavar="DIR",
                   help="only extract netty's epoll transports into DIR (the image does, at build time)")
    ns = p.parse_args()
    if ns.extract_netty_native:
        print("\n".join(str(f) for f in extract_netty_native(ns.extract_netty_native)))
        return
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "extract_netty_native"}
    print(ServeSettings(**given).properties(), end="")


if __name__ == "__main__":
    main()
